import math


def scalar_metrics(metrics: dict, prefix: str) -> dict:
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}"
        if isinstance(value, bool):
            flat[name] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(float(value)):
            flat[name] = float(value)
        elif isinstance(value, dict):
            flat.update(scalar_metrics(value, name))
    return flat
