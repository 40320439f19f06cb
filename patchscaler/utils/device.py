"""Devices: where a module's parameters live (weight-free modules: the given default), and the device an option
or a ``--device`` flag names."""
import torch

from .errors import ConfigError


def placement(module, device='cpu'):
    """(device, dtype) of ``module``'s first parameter, or (``device``, float32) when it has none."""
    param = next(iter(module.parameters()), None) if hasattr(module, 'parameters') else None
    if param is None:
        return torch.device(device), torch.float32
    return param.device, param.dtype


def resolve_device(device=None):
    """``None``/'auto' -> CUDA when available, else CPU; 'cpu', 'cuda', 'cuda:N' as given, checked (one-line errors)."""
    if device in (None, 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f'device {device} asked for but this torch sees no GPU')
    return device


def enable_tf32():
    """TF32 for float32 matmuls and convolutions on CUDA (Ampere and newer; 10-bit mantissa inputs, float32
    accumulation): what the command-line tools run with. The library itself never changes this global setting."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
