"""Where a module's parameters live, for feeding it inputs (weight-free modules: the given default)."""
import torch


def placement(module, device='cpu'):
    """(device, dtype) of ``module``'s first parameter, or (``device``, float32) when it has none."""
    param = next(iter(module.parameters()), None) if hasattr(module, 'parameters') else None
    if param is None:
        return torch.device(device), torch.float32
    return param.device, param.dtype
