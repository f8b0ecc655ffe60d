"""omni_fast.devices: the one place a device or a dtype is resolved."""
import pytest
import torch

from omni_fast import devices


def test_devices_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        devices.resolve_device("gpu0")
    with pytest.raises(ValueError, match="'mps' is not supported"):
        devices.resolve_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        devices.resolve_device("cuda")
    assert devices.resolve_device(None) == torch.device("cpu")


@pytest.mark.parametrize("spec,device,on_gpu,expected", [
    (None, "cpu", "float16", torch.float32), (None, "cuda", "float16", torch.float16),
    (None, "cuda", "bfloat16", torch.bfloat16), ("bfloat16", "cpu", "float16", torch.bfloat16),
    (torch.float16, "cpu", "bfloat16", torch.float16), ("float32", "cuda", "bfloat16", torch.float32)])
def test_dtypes_default_to_float32_on_the_cpu_and_the_callers_choice_on_a_gpu(spec, device, on_gpu, expected):
    assert devices.resolve_dtype(spec, torch.device(device), on_gpu) is expected


def test_an_unknown_dtype_is_named():
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        devices.resolve_dtype("fp8", torch.device("cpu"), "bfloat16")


def test_every_device_default_goes_through_resolve_device(monkeypatch):
    """The media loader and torchrun's context take their default device from resolve_device."""
    from omni_fast import distributed
    from omni_fast.config import LoaderConfig
    from omni_fast.media.loader import MediaLoader

    monkeypatch.setattr(devices, "resolve_device", lambda spec: torch.device("meta"))
    monkeypatch.setattr(distributed, "resolve_device", devices.resolve_device)
    assert distributed.init(None).device == torch.device("meta")
    from omni_fast.media import loader
    monkeypatch.setattr(loader, "resolve_device", devices.resolve_device)
    assert MediaLoader([], LoaderConfig(backend="pyav")).device == torch.device("meta")
