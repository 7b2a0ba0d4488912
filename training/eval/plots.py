"""Plots of the quantizer's held-out evaluation (PNG, matplotlib's Agg canvas, no pyplot).

    write_plots(model, eval_pairs, encoded, codebook, targets, probes, Path("eval"), step, seed)
    # {"codebook_usage": "eval/codebook_usage.png", "action_scatter": ..., "reconstructions": ...,
    #  "latent_explorer": ...}

Codebook usage; latent vs ground-truth action scatter (the paper's Figure 13); reconstructions against the
copy-frame-t baseline; the latent explorer (one frame decoded under every code of each slot: Figures 5 and 12).
matplotlib is imported inside the drawing functions, so that importing the evaluation (every training script
does) does not load it until a plot is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .actions import action_names, default_position_dims
from .encoding import EncodedPairs, as_unit_float
from .metrics import MIN_CODE_FRACTION, psnr

#: One bar chart per slot up to this many slots (a heat map beyond); the scatter and the explorer show at most
#: this many slots.
MAX_BAR_CHART_SLOTS = 8
MAX_PLOTTED_SLOTS = 4


def _new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, without pyplot (no global backend switch, no figure registry)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _image(tensor: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] (clamped) -> (H, W, 3) for imshow."""
    return tensor.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _code_colors(codebook_size: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if codebook_size <= 10 else "tab20" if codebook_size <= 20 else "turbo"]
    if codebook_size <= 20:
        return [cmap(i) for i in range(codebook_size)]
    return [cmap(i / max(1, codebook_size - 1)) for i in range(codebook_size)]


def plot_codebook_usage(codebook: dict, path: Path, *, title_suffix: str = "") -> Path:
    """Bars of the usage fraction of every code per slot (red below the 2% line; with more than
    `MAX_BAR_CHART_SLOTS` slots a slots x codes heat map instead), and the most frequent latent actions."""
    usage = np.asarray(codebook["usage"])
    num_slots, codebook_size = usage.shape
    bar_charts = num_slots <= MAX_BAR_CHART_SLOTS
    figure = _new_figure(max(8.0, 2.6 * num_slots) if bar_charts else 10.0, 6.2)
    grid = figure.add_gridspec(2, num_slots if bar_charts else 1, height_ratios=[1.2, 1.0], hspace=0.55, wspace=0.3)
    top = max(usage.max(), 1.0 / codebook_size) * 1.15
    for slot in range(num_slots if bar_charts else 0):
        ax = figure.add_subplot(grid[0, slot])
        colors = ["tab:red" if f < MIN_CODE_FRACTION else "tab:blue" for f in usage[slot]]
        ax.bar(np.arange(codebook_size), usage[slot], color=colors)
        ax.axhline(MIN_CODE_FRACTION, color="tab:red", linestyle="--", linewidth=1,
                   label=f"{MIN_CODE_FRACTION:.0%} floor")
        ax.axhline(1.0 / codebook_size, color="gray", linestyle=":", linewidth=1, label="uniform")
        ax.set_ylim(0, top)
        ax.set_xticks(np.arange(codebook_size))
        ax.set_xlabel("code")
        perplexity = codebook["perplexity_per_slot"][slot]
        ax.set_title(f"slot {slot}: perplexity {perplexity:.2f} / {codebook_size}", fontsize=9)
        if slot == 0:
            ax.set_ylabel("fraction of held-out pairs")
            ax.legend(fontsize=7, loc="upper right")
    if not bar_charts:
        ax = figure.add_subplot(grid[0, 0])
        shown = ax.imshow(usage.T, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("slot")
        ax.set_ylabel("code")
        below = len(codebook["codes_below_threshold"])
        ax.set_title(f"usage per slot and code; {below} of {usage.size} cells below {MIN_CODE_FRACTION:.0%}",
                     fontsize=9)
        figure.colorbar(shown, ax=ax, fraction=0.03).set_label("fraction of held-out pairs", fontsize=8)
    ax = figure.add_subplot(grid[1, :])
    frequent = codebook["most_frequent_latent_actions"]
    ax.bar(np.arange(len(frequent)), [f["fraction"] for f in frequent], color="tab:green")
    ax.set_xticks(np.arange(len(frequent)))
    # Long code sequences do not fit as tick labels: ranks instead (the tuples are in metrics.json).
    labels = [str(f["codes"]) for f in frequent] if bar_charts else [f"#{i + 1}" for i in range(len(frequent))]
    ax.set_xticklabels(labels, fontsize=8, rotation=20 if bar_charts else 0)
    ax.set_ylabel("fraction of pairs")
    possible = f"{codebook_size}^{num_slots}"
    if codebook_size**num_slots < 10**6:
        possible += f" = {codebook_size**num_slots}"
    ax.set_title(
        f"most frequent latent actions: {codebook['num_distinct_latent_actions']} distinct of {possible} possible "
        f"(perplexity {codebook['latent_action_perplexity']:.1f})",
        fontsize=9,
    )
    figure.suptitle(
        f"Codebook usage on held-out pairs (min code fraction {codebook['min_code_fraction']:.1%}){title_suffix}"
    )
    figure.savefig(path, bbox_inches="tight")
    return path


def plot_action_scatter(
    targets: np.ndarray, codes: np.ndarray, names: Sequence[str], position_dims: Sequence[int], codebook_size: int,
    path: Path, *, target_label: str = "window-mean action", title_suffix: str = "",
) -> Path:
    """The paper's Figure 13: held-out pairs placed at their ground-truth action (x-y, and x-z when there is a third
    position dimension), coloured by the code of each slot (one column per slot; X marks each code's mean), and in
    the last column by the most frequent latent actions (tuples; the rest grey)."""
    from matplotlib.lines import Line2D

    # Planes of position dimensions only (other dimensions, like a gripper, are not motions in the image).
    dims = list(position_dims) or list(range(len(names)))
    if len(dims) >= 3:
        planes = [(dims[0], dims[1]), (dims[0], dims[2])]
    elif len(dims) == 2:
        planes = [(dims[0], dims[1])]
    else:
        planes = [(dims[0], None)]  # 1-D action: the action against the code
    num_pairs, num_slots = codes.shape
    shown_slots = min(num_slots, MAX_PLOTTED_SLOTS)
    colors = np.array(_code_colors(codebook_size))
    tuples, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    top_tuples = np.argsort(-counts, kind="stable")[:8]
    tuple_rank = np.full(len(tuples), -1)
    tuple_rank[top_tuples] = np.arange(len(top_tuples))
    tuple_colors = np.array(_code_colors(10))[:8]
    jitter = np.random.default_rng(0).uniform(-0.3, 0.3, num_pairs)
    figure = _new_figure(2.9 * (shown_slots + 1) + 2.2, 2.9 * len(planes) + 1.0)
    grid = figure.add_gridspec(len(planes), shown_slots + 1, wspace=0.32, hspace=0.42)
    for row, (dim_x, dim_y) in enumerate(planes):
        x = targets[:, dim_x]
        for column in range(shown_slots + 1):
            ax = figure.add_subplot(grid[row, column])
            if column < shown_slots:
                slot_codes = codes[:, column]
                y = targets[:, dim_y] if dim_y is not None else slot_codes + jitter
                ax.scatter(x, y, s=8, alpha=0.5, c=colors[slot_codes], linewidths=0)
                used = np.unique(slot_codes)
                means = np.array([[x[slot_codes == c].mean(), y[slot_codes == c].mean()] for c in used])
                ax.scatter(means[:, 0], means[:, 1], s=80, marker="X", c=colors[used], edgecolors="black",
                           linewidths=0.8, zorder=3)
                ax.set_title(f"colour: code of slot {column}", fontsize=9)
            else:
                y = targets[:, dim_y] if dim_y is not None else inverse + jitter
                ranks = tuple_rank[inverse]
                rest = ranks < 0
                ax.scatter(x[rest], y[rest], s=5, alpha=0.35, color="lightgray", linewidths=0)
                ax.scatter(x[~rest], y[~rest], s=6, alpha=0.65, c=tuple_colors[ranks[~rest]], linewidths=0)
                ax.set_title("colour: latent action (top 8)", fontsize=9)
                if row == 0:
                    handles = [Line2D([], [], marker="o", linestyle="", color=tuple_colors[rank],
                                      label=f"{tuples[t].tolist()} {counts[t] / num_pairs:.0%}")
                               for rank, t in enumerate(top_tuples)]
                    handles.append(Line2D([], [], marker="o", linestyle="", color="lightgray", label="other"))
                    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
            ax.set_xlabel(f"{names[dim_x]} ({target_label})", fontsize=8)
            ax.set_ylabel(names[dim_y] if dim_y is not None else "code", fontsize=8)
            ax.tick_params(labelsize=7)
    handles = [
        Line2D([], [], marker="o", linestyle="", color=colors[code], label=f"code {code}")
        for code in range(codebook_size)
    ]
    # Below the axes (the saved image grows to include it), where it cannot cover the x labels.
    figure.legend(handles=handles, loc="upper center", ncol=min(codebook_size, 16), fontsize=8, frameon=False,
                  bbox_to_anchor=(0.42, 0.0))
    more = f"; first {shown_slots} of {num_slots} slots" if shown_slots < num_slots else ""
    figure.suptitle(
        f"Latent actions vs ground-truth actions on held-out pairs (X = mean of a code{more}){title_suffix}",
        y=0.98 + 0.05 / len(planes),
    )
    figure.savefig(path, bbox_inches="tight")
    return path


def _pick_display_pairs(encoded: EncodedPairs, count: int, seed: int) -> np.ndarray:
    """Rows of `encoded` to show: pairs where something moves (copy MSE at least the median), from distinct
    episodes where possible, seeded."""
    rng = np.random.default_rng(seed)
    moving = np.flatnonzero(encoded.copy_mse >= np.median(encoded.copy_mse))
    moving = rng.permutation(moving)
    chosen, seen = [], set()
    for row in moving:  # first pass: one per episode
        if encoded.episode_index[row] not in seen:
            chosen.append(row)
            seen.add(encoded.episode_index[row])
        if len(chosen) == count:
            break
    for row in moving:
        if len(chosen) == count:
            break
        if row not in chosen:
            chosen.append(row)
    return np.array(chosen, dtype=np.int64)


def _mosaic(tiles: list[list[np.ndarray | None]], gap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tiles (rows x columns of (h, w, 3) RGB in [0, 1], or None for an empty cell), all the same size, on one white
    canvas with `gap` pixels between them. One image in one axes draws far faster than an axes per tile.

    Returns the canvas (H, W, 3), and the pixel offsets of each tile row (top) and column (left)."""
    first = next(tile for row in tiles for tile in row if tile is not None)
    height, width = first.shape[:2]
    num_rows, num_columns = len(tiles), max(len(row) for row in tiles)
    tops = gap + np.arange(num_rows) * (height + gap)
    lefts = gap + np.arange(num_columns) * (width + gap)
    canvas = np.ones((tops[-1] + height + gap, lefts[-1] + width + gap, 3))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            if tile is not None:
                canvas[tops[r] : tops[r] + height, lefts[c] : lefts[c] + width] = tile
    return canvas, tops, lefts


def _colormapped(values: np.ndarray, cmap_name: str, low: float, high: float) -> np.ndarray:
    """(h, w) values -> (h, w, 3) RGB through a matplotlib colormap on [low, high]."""
    import matplotlib

    scaled = np.clip((values - low) / (high - low), 0.0, 1.0)
    return matplotlib.colormaps[cmap_name](scaled)[..., :3]


def _mosaic_axes(ax, canvas: np.ndarray, tops, lefts, tile_size, *, row_labels=None, column_labels=None) -> None:
    """Shows a mosaic in `ax` with row labels on the left and column labels on top, as tick labels."""
    height, width = tile_size
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks(lefts + width / 2 - 0.5)
    ax.set_xticklabels(column_labels or [""] * len(lefts), fontsize=8)
    ax.set_yticks(tops + height / 2 - 0.5)
    ax.set_yticklabels(row_labels or [""] * len(tops), fontsize=9)
    ax.tick_params(length=0, top=True, labeltop=True, bottom=False, labelbottom=False)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _colorbar(figure, ax, cmap_name: str, low: float, high: float, label: str) -> None:
    import matplotlib
    from matplotlib.cm import ScalarMappable

    mappable = ScalarMappable(norm=matplotlib.colors.Normalize(low, high), cmap=matplotlib.colormaps[cmap_name])
    colorbar = figure.colorbar(mappable, ax=ax, fraction=0.025, pad=0.015)
    colorbar.set_label(label, fontsize=8)
    colorbar.ax.tick_params(labelsize=7)


def plot_reconstructions(
    frames: torch.Tensor, predictions: torch.Tensor, captions: list[str], path: Path, *, title_suffix: str = ""
) -> Path:
    """Columns = held-out pairs; rows: frame t, true t+H, predicted t+H (clamped), |copy error| = |x_{t+H} - x_t|
    and |prediction error|, both averaged over RGB on one shared colour scale; the PSNR of both above each column.

    frames (K, 2, 3, H, W) in [0, 1]; predictions (K, 3, H, W); captions: K strings."""
    predictions = predictions.float().clamp(0, 1)
    copy_error = (frames[:, 1] - frames[:, 0]).abs().mean(dim=1).numpy()
    prediction_error = (frames[:, 1] - predictions).abs().mean(dim=1).numpy()
    vmax = max(float(np.quantile(np.concatenate([copy_error.ravel(), prediction_error.ravel()]), 0.995)), 0.05)
    count = frames.shape[0]
    tiles = [
        [_image(frames[k, 0]) for k in range(count)],
        [_image(frames[k, 1]) for k in range(count)],
        [_image(predictions[k]) for k in range(count)],
        [_colormapped(copy_error[k], "magma", 0, vmax) for k in range(count)],
        [_colormapped(prediction_error[k], "magma", 0, vmax) for k in range(count)],
    ]
    labels = []
    for k in range(count):
        mse_copy = float((frames[k, 1] - frames[k, 0]).square().mean())
        mse_prediction = float((frames[k, 1] - predictions[k]).square().mean())
        labels.append(f"{captions[k]}\ncopy {psnr(mse_copy):.1f} dB\npredicted {psnr(mse_prediction):.1f} dB")
    size = frames.shape[-2:]
    canvas, tops, lefts = _mosaic(tiles, gap=max(1, size[0] // 16))
    figure = _new_figure(1.75 * count + 2.2, 1.75 * 5 + 1.4)
    ax = figure.add_subplot(1, 1, 1)
    _mosaic_axes(ax, canvas, tops, lefts, size, column_labels=labels,
                 row_labels=["frame t", "true t+H", "predicted t+H", "|copy error|", "|prediction error|"])
    _colorbar(figure, ax, "magma", 0, vmax, "error rows: mean |error| over RGB")
    figure.suptitle(f"Held-out reconstructions (PSNR per pair, peak 1){title_suffix}")
    figure.savefig(path, bbox_inches="tight")
    return path


@torch.no_grad()
def latent_explorer_images(
    model, frame_t: torch.Tensor, own_codes: torch.Tensor, max_codes: int = 16, max_slots: int = MAX_PLOTTED_SLOTS
) -> torch.Tensor:
    """Frame t decoded under every code of every slot, the other slots kept at the frame's own codes.

    Args:
        frame_t: (3, H, W) in [0, 1]; own_codes: (s,) the pair's latent action.
    Returns:
        (S, K, 3, H, W) decoded frames for the first S = min(s, max_slots) slots and K = min(|C|, max_codes) codes:
        entry [slot, c] uses code c in `slot`.
    """
    code_seq_len = model.config.code_seq_len
    num_slots = min(code_seq_len, max_slots)
    num_codes = min(model.config.codebook_size, max_codes)
    device = next(model.parameters()).device
    codes = own_codes.to(device).reshape(1, 1, code_seq_len).repeat(num_slots, num_codes, 1)
    for slot in range(num_slots):
        codes[slot, :, slot] = torch.arange(num_codes, device=device)
    frames = frame_t.to(device, next(model.parameters()).dtype).unsqueeze(0).expand(num_slots * num_codes, -1, -1, -1)
    decoded = model.decode(frames.contiguous(), codes.reshape(-1, code_seq_len))
    return decoded.float().reshape(num_slots, num_codes, *decoded.shape[1:])


def plot_latent_explorer(
    model, pair: torch.Tensor, own_codes: torch.Tensor, own_prediction: torch.Tensor, path: Path, *,
    caption: str = "", title_suffix: str = "",
) -> Path:
    """The paper's Figures 5 and 12: one held-out frame decoded under every code of each slot (the other slots at
    the frame's own codes).

    Top: frame t, true t+H, the decoding with the pair's own latent action, the true change (t+H - t) and the
    predicted change (decoding - t). Below, per slot: the decoded frames (the pair's own code framed in red), then
    how each differs from the decoding under the pair's own latent action (mean over RGB, signed: red = brighter,
    blue = darker). That difference shows what choosing the code does; the decoder's blur, common to all codes,
    cancels out of it.

    pair (2, 3, H, W) in [0, 1]; own_codes (s,); own_prediction (3, H, W)."""
    from matplotlib.patches import Rectangle

    decoded = latent_explorer_images(model, pair[0], own_codes).cpu().clamp(0, 1)
    num_slots, num_codes = decoded.shape[:2]
    frame_t, frame_next = pair[0].float().cpu(), pair[1].float().cpu()
    own_prediction = own_prediction.float().cpu().clamp(0, 1)
    versus_own = (decoded - own_prediction).mean(dim=2).numpy()  # (S, K, H, W)
    true_change = (frame_next - frame_t).mean(dim=0).numpy()
    predicted_change = (own_prediction - frame_t).mean(dim=0).numpy()
    header_limit = max(float(np.abs(true_change).max()), float(np.abs(predicted_change).max()), 0.05)
    limit = max(float(np.quantile(np.abs(versus_own), 0.999)), 0.02)
    size = frame_t.shape[-2:]
    gap = max(1, size[0] // 10)

    header, header_tops, header_lefts = _mosaic([[
        _image(frame_t), _image(frame_next), _image(own_prediction),
        _colormapped(true_change, "RdBu_r", -header_limit, header_limit),
        _colormapped(predicted_change, "RdBu_r", -header_limit, header_limit),
    ]], gap)
    tiles = []
    for slot in range(num_slots):
        tiles.append([_image(decoded[slot, code]) for code in range(num_codes)])
        tiles.append([_colormapped(versus_own[slot, code], "RdBu_r", -limit, limit) for code in range(num_codes)])
    canvas, tops, lefts = _mosaic(tiles, gap)

    columns = max(num_codes, 5)
    figure = _new_figure(1.2 * columns + 2.4, 1.2 * (2 * num_slots + 1) + 2.2)
    grid = figure.add_gridspec(2, 1, height_ratios=[1.35, 2 * num_slots], hspace=0.12)
    ax_header = figure.add_subplot(grid[0])
    _mosaic_axes(ax_header, header, header_tops, header_lefts, size, column_labels=[
        "frame t", "true t+H", f"decoded, own\n{own_codes.tolist()}",
        f"true change\n(+-{header_limit:.2f})", f"predicted change\n(+-{header_limit:.2f})",
    ])
    ax = figure.add_subplot(grid[1])
    # The largest difference a slot's codes make, in the label: a slot whose codes change nothing is visible at once.
    row_labels = [
        label for slot in range(num_slots)
        for label in (f"slot {slot}", f"slot {slot} vs own\nmax |diff| {np.abs(versus_own[slot]).max():.3f}")
    ]
    _mosaic_axes(ax, canvas, tops, lefts, size, row_labels=row_labels,
                 column_labels=[f"code {code}" for code in range(num_codes)])
    for slot in range(num_slots):
        own = int(own_codes[slot])
        if own < num_codes:  # frame the pair's own code in both rows of the slot
            ax.add_patch(Rectangle(
                (lefts[own] - gap / 2 - 0.5, tops[2 * slot] - gap / 2 - 0.5), size[1] + gap, 2 * size[0] + 2 * gap,
                fill=False, edgecolor="tab:red", linewidth=2.0,
            ))
    _colorbar(figure, ax, "RdBu_r", -limit, limit, "'vs own' rows: decoded - decoded with own codes (mean over RGB)")
    shown = []
    if num_codes < model.config.codebook_size:
        shown.append(f"first {num_codes} of {model.config.codebook_size} codes")
    if num_slots < model.config.code_seq_len:
        shown.append(f"first {num_slots} of {model.config.code_seq_len} slots")
    more = f" ({', '.join(shown)})" if shown else ""
    figure.suptitle(
        f"Latent explorer: one frame decoded under every code of each slot{more}, the other slots at the pair's own "
        f"codes (red frame)\n{caption}{title_suffix}", fontsize=10,
    )
    figure.savefig(path, bbox_inches="tight")
    return path


@torch.no_grad()
def write_plots(model, eval_pairs, encoded: EncodedPairs, codebook: dict, targets, probes: dict, output_dir: Path,
                step, seed: int) -> dict[str, str]:
    """Draws the four plots of one evaluation into `output_dir` (created); returns {plot name: PNG path}.

    targets: (N, A) probe targets of the encoded pairs, or None (no action scatter); the displayed pairs are re-read
    from `eval_pairs` (seeded choice) rather than kept through the pass."""
    output_dir.mkdir(parents=True, exist_ok=True)
    suffix = f", step {step}" if step is not None else ""
    paths = {"codebook_usage": plot_codebook_usage(codebook, output_dir / "codebook_usage.png", title_suffix=suffix)}
    if targets is not None:
        names = probes.get("action_names") or action_names(eval_pairs, targets.shape[1])
        dims = probes.get("position_dims")
        if dims is None:
            dims = default_position_dims(names) or list(range(min(3, len(names))))
        label = "window-mean action" if probes.get("action_target") == "window_mean" else "action at t"
        paths["action_scatter"] = plot_action_scatter(
            targets, encoded.codes, names, dims, model.config.codebook_size, output_dir / "action_scatter.png",
            target_label=label, title_suffix=suffix,
        )
    # Re-read the few displayed pairs instead of keeping every pair's pixels through the pass.
    rows = _pick_display_pairs(encoded, min(6, len(encoded)), seed)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    frames = torch.stack(
        [as_unit_float(eval_pairs[int(encoded.dataset_index[r])]["pixel_values"]) for r in rows]
    ).float()
    own_codes = torch.as_tensor(encoded.codes[rows])
    predictions = model.decode(frames[:, 0].to(device, dtype), own_codes.to(device)).float().cpu()
    captions = [
        f"ep {encoded.episode_index[r]}, t={encoded.frame_index[r]}\n{own_codes[i].tolist()}"
        for i, r in enumerate(rows)
    ]
    paths["reconstructions"] = plot_reconstructions(frames, predictions, captions, output_dir / "reconstructions.png",
                                                    title_suffix=suffix)
    r = rows[0]
    paths["latent_explorer"] = plot_latent_explorer(
        model, frames[0], own_codes[0], predictions[0], output_dir / "latent_explorer.png",
        caption=f"episode {encoded.episode_index[r]}, frame {encoded.frame_index[r]}", title_suffix=suffix,
    )
    return {name: str(path) for name, path in paths.items()}



__all__ = [
    "latent_explorer_images",
    "plot_action_scatter",
    "plot_codebook_usage",
    "plot_latent_explorer",
    "plot_reconstructions",
    "write_plots",
]
