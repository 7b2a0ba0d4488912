"""A tiny quantizer learns latent actions on synthetic moving squares: its reconstruction beats copying frame t
and it uses more than one code."""

import torch
import torch.nn.functional as F

from modeling_lapa import LAPAQuantizerConfig, LAPAQuantizerModel


def moving_squares(n: int, size: int = 32, square: int = 8, shift: int = 4, seed: int = 0):
    """Pairs (n, 2, 3, size, size): a coloured square on black, moved by one of 4 offsets (right/left/down/up)."""
    g = torch.Generator().manual_seed(seed)
    offsets = [(0, shift), (0, -shift), (shift, 0), (-shift, 0)]
    pairs = torch.zeros(n, 2, 3, size, size)
    direction = torch.randint(0, len(offsets), (n,), generator=g)
    for i in range(n):
        y, x = torch.randint(shift, size - square - shift, (2,), generator=g).tolist()
        color = (torch.rand(3, generator=g) * 0.8 + 0.2)[:, None, None]
        dy, dx = offsets[direction[i]]
        pairs[i, 0, :, y : y + square, x : x + square] = color
        pairs[i, 1, :, y + dy : y + dy + square, x + dx : x + dx + square] = color
    return pairs, direction


def test_tiny_quantizer_learns_moving_squares():
    torch.manual_seed(0)
    config = LAPAQuantizerConfig(
        hidden_size=64, quant_dim=16, codebook_size=8, code_seq_len=4, image_size=32, patch_size=4,
        spatial_depth=1, temporal_depth=1, num_heads=2, head_dim=32,
    )
    model = LAPAQuantizerModel(config).train()
    pairs, _ = moving_squares(32)
    copy_baseline = F.mse_loss(pairs[:, 0], pairs[:, 1]).item()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    replaced_any = False
    for step in range(1, 301):
        out = model(pairs, step=step)
        replaced_any |= out.replaced_codes is not None
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        final = model(pairs)
    assert replaced_any  # the reference replacement schedule ran during training
    assert final.loss.item() < 0.5 * copy_baseline, (final.loss.item(), copy_baseline)
    assert final.codes.unique().numel() > 1
    assert len({tuple(c) for c in final.codes.tolist()}) > 1
