"""Hugging Face and GGUF, in and out (see docs/export.md).

    folder.py  the openmill model folder, tokenizer facts (special tokens, chat template), ExportError
    hf.py      transformers folders: export_hf, import_hf
    gguf.py    llama.cpp GGUF files: export_gguf, import_gguf
"""

from openmill.export.folder import ExportError
from openmill.export.gguf import export_gguf, import_gguf
from openmill.export.hf import export_hf, import_hf

__all__ = ["ExportError", "export_gguf", "export_hf", "import_gguf", "import_hf"]
