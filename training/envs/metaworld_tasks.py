"""Meta-World task sets and their natural-language instructions.

Pure data and name handling: importing this module imports neither MuJoCo nor Meta-World, so a CLI can
validate task names (and fail fast with a helpful message) before any simulator or renderer starts.

The task lists mirror ``metaworld.env_dict.MT10_V3`` / ``MT50_V3`` of Meta-World 3.x (same names, same
order); ``tests/test_metaworld_data.py`` checks that they agree with the installed package.
"""

from __future__ import annotations

#: The ten tasks of the MT10 benchmark, in Meta-World's order.
MT10_TASKS: tuple[str, ...] = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)

#: One instruction per MT50 task, phrased as a person would ask a robot (lower case, no final period),
#: written from the task's goal and from looking at the rendered scene (e.g. the pushed object is a puck).
TASK_INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "put the nut onto the peg",
    "basketball-v3": "dunk the basketball into the hoop",
    "bin-picking-v3": "move the block from one bin into the other bin",
    "box-close-v3": "put the lid on the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top, reaching past the wall",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "press the button from the front, reaching past the wall",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "take the nut off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door",
    "hand-insert-v3": "put the gripper into the hole",
    "drawer-close-v3": "close the drawer",
    "drawer-open-v3": "open the drawer",
    "faucet-open-v3": "turn the faucet on",
    "faucet-close-v3": "turn the faucet off",
    "hammer-v3": "hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the puck up out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the goal",
    "plate-slide-side-v3": "slide the plate sideways into the goal",
    "plate-slide-back-v3": "slide the plate back out of the goal",
    "plate-slide-back-side-v3": "slide the plate sideways out of the goal",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "soccer-v3": "kick the ball into the goal",
    "stick-push-v3": "push the thermos with the stick",
    "stick-pull-v3": "pull the thermos with the stick",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "push-back-v3": "pull the puck back to the goal",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach over the wall to the goal position",
    "shelf-place-v3": "place the block on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "open the window",
    "window-close-v3": "close the window",
}

#: All fifty tasks of the MT50 benchmark, in Meta-World's order.
MT50_TASKS: tuple[str, ...] = tuple(TASK_INSTRUCTIONS)

#: Named task sets accepted by :func:`resolve_task_names` (case-insensitive).
TASK_SETS: dict[str, tuple[str, ...]] = {"mt10": MT10_TASKS, "mt50": MT50_TASKS}

#: Cameras of Meta-World's Sawyer scene (every task shares them). ``corner*`` are fixed views that MuJoCo
#: renders upside down (our env turns them upright), ``topview`` looks down on the table, ``behindGripper``
#: and ``gripperPOV`` move with the hand.
CAMERA_NAMES: tuple[str, ...] = (
    "corner",
    "corner2",
    "corner3",
    "corner4",
    "topview",
    "behindGripper",
    "gripperPOV",
)

#: Suffix of the Meta-World version whose tasks and expert policies we use.
TASK_VERSION_SUFFIX = "-v3"


def canonical_task_name(name: str) -> str:
    """Return the full Meta-World name of a task given with or without its version suffix.

    ``"drawer-open"`` and ``"drawer-open-v3"`` both give ``"drawer-open-v3"``.

    Raises:
        ValueError: the name is not an MT50 task; the message lists the valid names.
    """
    cleaned = name.strip().lower()
    if not cleaned.endswith(TASK_VERSION_SUFFIX):
        cleaned += TASK_VERSION_SUFFIX
    if cleaned not in TASK_INSTRUCTIONS:
        valid = ", ".join(sorted(name.removesuffix(TASK_VERSION_SUFFIX) for name in MT50_TASKS))
        raise ValueError(
            f"Unknown Meta-World task {name!r}. Valid task names (the '{TASK_VERSION_SUFFIX}' suffix is "
            f"optional): {valid}; or a task set: {', '.join(TASK_SETS)}."
        )
    return cleaned


def resolve_task_names(spec: str) -> list[str]:
    """Turn a ``--tasks`` value into the list of Meta-World task names it denotes.

    Args:
        spec: ``"mt10"``, ``"mt50"`` (any case), or comma-separated task names with or without the
            version suffix, e.g. ``"drawer-open-v3,button-press-topdown"``. Set names may be mixed in.

    Returns:
        Full task names (``"...-v3"``) in the given order, without duplicates.

    Raises:
        ValueError: empty spec or an unknown name (the message lists the valid names).
    """
    tasks: list[str] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        names = TASK_SETS.get(item.lower()) or (canonical_task_name(item),)
        tasks.extend(name for name in names if name not in tasks)
    if not tasks:
        raise ValueError(f"No Meta-World task given in {spec!r}; use mt10, mt50 or task names.")
    return tasks


def task_instruction(task_name: str) -> str:
    """The natural-language instruction of a task, e.g. ``"open the drawer"`` for ``drawer-open-v3``."""
    return TASK_INSTRUCTIONS[canonical_task_name(task_name)]
