"""tunesmith: fine-tune language models for a domain, task, style or output format."""

import logging
import warnings

__version__ = "0.1.0"

# bitsandbytes logs a warning on import, on CPUs with AVX512-BF16, that an optional kernel for its packed 4-bit
# CPU path is missing. tunesmith never takes that path (train/speed.py: use_portable_kernels), so on every
# command it would only be noise; the filter costs nothing and imports nothing.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.msg)

# PEFT reads transformers' renamed `is_gradient_checkpointing` whenever we wrap a model; the FutureWarning is
# about PEFT's code, not the user's, and would otherwise print on every train, eval and serve.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
