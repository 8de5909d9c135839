"""Deploy: pack a trained network to 1 bit per binary weight and run it without multiplications.

    net = export_run("runs/det-s1")              # or export_model(model, input_shape)
    net.save("model.bcnn")                       # safetensors, no pickle; see format.py / the README
    model = load_packed("model.bcnn")            # validated; compiled kernels, or the PyTorch fallback
    logits = model(x)                            # x: [B, *input_shape] float32
    print(format_summary(summarize(net)))        # params, bytes on disk, MACs replaced by additions

Modules: ``pack`` (bit packing), ``format`` (the file), ``convert`` (model -> packed network, batch-norm
folding), ``native`` (building and loading the C++ kernels), ``engine`` (inference), ``summary``.
"""

from .convert import ExportError, export_model, export_run
from .engine import ENGINES, PackedModel, load_packed
from .format import FORMAT, FORMAT_VERSION, PackedFormatError, PackedNetwork, read_packed
from .native import NativeUnavailable
from .pack import pack_bits, unpack_bits
from .summary import format_summary, summarize

__all__ = [
    "ENGINES", "FORMAT", "FORMAT_VERSION", "ExportError", "NativeUnavailable", "PackedFormatError", "PackedModel",
    "PackedNetwork", "export_model", "export_run", "format_summary", "load_packed", "pack_bits", "read_packed",
    "summarize", "unpack_bits",
]
