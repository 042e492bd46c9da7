"""Build the real CLIP tokenizer offline from the BPE merges that open_clip_torch ships.

Stable Diffusion 1.x uses OpenAI's CLIP BPE tokenizer (49,408 ids). Its merges
file is part of the `open_clip_torch` wheel, so the tokenizer can be rebuilt
without the Hub: the vocabulary is the 256 byte-level symbols, the same 256
with the end-of-word marker `</w>`, every merge joined, then the two special
tokens. Install the wheel with `pip install --no-deps open_clip_torch`; its
torchvision dependency would replace the CPU torch build.

Usage: `python small_model/clip_tokenizer.py OUT_DIR` writes vocab.json,
merges.txt and the tokenizer config into OUT_DIR.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import sys

# The merges file has a header line, then 48,894 merges used by CLIP
# (49,152 - 256 - 2 = 48,894 ids after the byte symbols and special tokens).
NUM_CLIP_MERGES = 49152 - 256 - 2


def find_bpe_file() -> str:
    """Return the path of open_clip's BPE merges file without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "The CLIP tokenizer is built from open_clip_torch's BPE file; install it with "
            "`pip install --no-deps open_clip_torch` (with dependencies it pulls a CUDA torch build)."
        )
    path = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.isfile(path):
        raise RuntimeError(f"open_clip_torch is installed but {path} is missing.")
    return path


def byte_unicode_symbols() -> list[str]:
    """Return CLIP's 256 printable stand-ins for the byte values, in vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def write_clip_tokenizer_files(out_dir: str) -> str:
    """Write vocab.json, merges.txt and tokenizer_config.json for CLIP's tokenizer; return out_dir."""
    with gzip.open(find_bpe_file(), "rt", encoding="utf-8") as handle:
        merge_lines = handle.read().split("\n")[1 : NUM_CLIP_MERGES + 1]
    merges = [tuple(line.split()) for line in merge_lines]

    symbols = byte_unicode_symbols()
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump(vocab, handle, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n")
        handle.write("\n".join(" ".join(pair) for pair in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    return out_dir


def load_clip_tokenizer(out_dir: str):
    """Write the tokenizer files into out_dir (if absent) and load them as a CLIPTokenizer."""
    from transformers import CLIPTokenizer

    if not os.path.isfile(os.path.join(out_dir, "merges.txt")):
        write_clip_tokenizer_files(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir, model_max_length=77)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python small_model/clip_tokenizer.py OUT_DIR")
    tokenizer = load_clip_tokenizer(sys.argv[1])
    print(f"wrote a CLIP tokenizer with {len(tokenizer)} ids to {sys.argv[1]}")
