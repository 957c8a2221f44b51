"""Speed and memory switches applied to a model before training, each one a config option.

CPU path (tested): gradient checkpointing and handing freed memory back to the OS. GPU path (off the
CPU test path): FlashAttention 2 (whose varlen kernel serves packed rows), Liger's fused kernels, and
torch.compile. Every switch that needs a missing package fails with the install command.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import sys
from typing import Any

import torch

from tunesmith.config import TrainConfig
from tunesmith.errors import TunesmithError


def attention_implementation(setting: str) -> str:
    """The attention kernel to load the model with; auto prefers FlashAttention 2 on a GPU that has it."""
    flash_installed = importlib.util.find_spec("flash_attn") is not None
    if setting == "auto":
        return "flash_attention_2" if torch.cuda.is_available() and flash_installed else "sdpa"
    if setting == "flash_attention_2" and not (torch.cuda.is_available() and flash_installed):
        raise TunesmithError(
            "train.attention: flash_attention_2 needs a CUDA GPU and the flash-attn package "
            "(pip install flash-attn --no-build-isolation); use sdpa here."
        )
    return setting


class MemoryReleaser:
    """Returns freed heap memory to the OS between decoder layers and after each optimizer step.

    glibc keeps memory freed by one layer's activations mapped instead of reusing it fully, so the
    resident size of a CPU training step drifted to ~1.5 GiB above what was alive (Gemma 3 270M,
    8 x 231 tokens). malloc_trim(0) after each layer's forward and backward keeps it near the live size.
    """

    def __init__(self, per_layer: bool = True) -> None:
        self.per_layer = per_layer
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        self._trim = getattr(libc, "malloc_trim", None)
        self._handles: list[Any] = []

    @property
    def available(self) -> bool:
        return self._trim is not None

    def release(self) -> None:
        if self._trim is not None:
            self._trim(0)

    def _after_forward(self, module: Any, args: Any, output: Any) -> None:
        if not module.training:
            return
        self.release()
        hidden = output[0] if isinstance(output, tuple) else output
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(self._after_backward)

    def _after_backward(self, grad: torch.Tensor) -> None:
        self.release()

    def attach(self, model: Any) -> None:
        if not self.per_layer:
            return
        for layer in decoder_layers(model):
            self._handles.append(layer.register_forward_hook(self._after_forward))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def decoder_layers(model: Any) -> list[Any]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return list(layers) if layers is not None else []


def memory_releaser(settings: TrainConfig, device: torch.device) -> MemoryReleaser | None:
    """The releaser for this run (None when off); per_layer says whether to hook every decoder layer."""
    mode = settings.release_memory
    if mode == "auto":
        mode = "step" if device.type == "cpu" else "off"
    if mode == "off":
        return None
    releaser = MemoryReleaser(per_layer=mode == "layer")
    return releaser if releaser.available else None


def use_portable_kernels(model: Any) -> int:
    """Keep every 4-bit layer on bitsandbytes' dequantize-and-matmul path, whatever the CPU; returns layers changed.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place the first time a layer runs in
    eval mode without grad (our validation pass) and from then on multiplies through `gemv_4bit`, which has
    no autograd kernel: the training steps after a validation get wrong LoRA gradients. The packed kernel
    also computes in bf16 (other numbers than on any other CPU) and cannot serve small layers at all (it
    needs out_features % 32 == 0 and whole quantization blocks per row). So it is never taken, and a weight
    already packed is unpacked.
    """
    if "bitsandbytes" not in sys.modules:  # no 4-bit layer can exist; importing it would only cost time and noise
        return 0
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f

    changed = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = bnb_f._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
            module.quant_state = weight.quant_state
            changed += 1
    return changed


def prepare_model(model: Any, settings: TrainConfig) -> Any:
    """Apply the config's speed switches in place; returns the model (the same object)."""
    use_portable_kernels(model)  # also for a 4-bit model not loaded through load_base: see its docstring
    if settings.gradient_checkpointing:
        # Non-reentrant checkpointing: works with frozen embeddings (LoRA) and with hooks inside layers.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if settings.liger_kernels:
        apply_liger(model)
    if settings.compile:
        # Each decoder layer is compiled in place: the loss calls the decoder directly (the chunked loss runs
        # the output layer itself), so a torch.compile wrapper around the whole model would never run, and its
        # parameter names would gain an `_orig_mod.` prefix that checkpoints and adapters must not carry.
        for layer in model.get_decoder().layers:
            layer.compile()
    return model


def apply_liger(model: Any) -> None:
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise TunesmithError("train.liger_kernels needs the liger-kernel package: pip install liger-kernel.") from None
    if not torch.cuda.is_available():
        raise TunesmithError("train.liger_kernels runs Triton kernels and needs a CUDA GPU; set it to false here.")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(model=base)
