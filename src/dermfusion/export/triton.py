"""A Triton Inference Server model repository around an exported ONNX graph.

    <out>/<model_name>/config.pbtxt      platform "onnxruntime_onnx", inputs/outputs, dynamic batching
    <out>/<model_name>/1/model.onnx

Inputs and outputs are read from the ONNX graph itself, so the config cannot drift from the model.
Dims exclude the batch dimension (Triton adds it when ``max_batch_size > 0``). The graph's
``dermfusion.*`` metadata (classes, preprocessing) is repeated as config ``parameters`` so a client
can read it from Triton's model-config endpoint.

``parse_pbtxt`` is a small parser for the protobuf text format used by config.pbtxt (no Triton or
protobuf schema needed), used by the tests to check a written repository against its graph.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Sequence

# ONNX TensorProto element type -> Triton data type
ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16",
                  6: "TYPE_INT32", 7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16",
                  11: "TYPE_FP64", 12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16"}
_NAME_OK = re.compile(r"^[A-Za-z0-9_.\-]+$")


def graph_io(onnx_path: str | Path) -> tuple[list[dict], list[dict], dict]:
    """(inputs, outputs, metadata_props) of an ONNX file: each io = {name, data_type, dims (incl. batch; -1 dynamic)}."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)

    def io(values) -> list[dict]:
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            out.append({"name": v.name, "data_type": ONNX_TO_TRITON.get(tt.elem_type, f"UNSUPPORTED_{tt.elem_type}"),
                        "dims": dims})
        return out

    inits = {i.name for i in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in inits]
    return io(inputs), io(proto.graph.output), {p.key: p.value for p in proto.metadata_props}


def _q(s: str) -> str:
    """A protobuf text-format string literal (C escapes; non-ASCII as octal UTF-8 bytes)."""
    out = []
    for byte in s.encode("utf-8"):
        ch = chr(byte)
        if ch in {'"', "\\"}:
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def triton_config(onnx_path: str | Path, model_name: str, max_batch_size: int = 32,
                  preferred_batch_sizes: Sequence[int] | None = None, max_queue_delay_us: int = 2000,
                  instance_count: int = 1, instance_kind: str = "KIND_CPU") -> str:
    """The config.pbtxt text for ``onnx_path`` (whose first dimension must be the dynamic batch)."""
    inputs, outputs, meta = graph_io(onnx_path)
    for t in inputs + outputs:
        if not t["dims"] or t["dims"][0] != -1:
            raise ValueError(f"{onnx_path}: tensor {t['name']!r} has no dynamic batch dimension "
                             f"(dims {t['dims']}); export with a dynamic batch")
        if t["data_type"].startswith("UNSUPPORTED"):
            raise ValueError(f"{onnx_path}: tensor {t['name']!r} has a type Triton does not support")
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be >= 1 (the graph is batched)")
    pref = sorted({b for b in (preferred_batch_sizes or [max_batch_size]) if 1 <= b <= max_batch_size})
    lines = [f"name: {_q(model_name)}", 'platform: "onnxruntime_onnx"', f"max_batch_size: {int(max_batch_size)}"]

    def block(kind: str, tensors: list[dict]) -> None:
        lines.append(f"{kind} [")
        for i, t in enumerate(tensors):
            dims = ", ".join(str(d) for d in t["dims"][1:])
            lines.extend(["  {", f"    name: {_q(t['name'])}", f"    data_type: {t['data_type']}",
                          f"    dims: [ {dims} ]", "  }" + ("," if i < len(tensors) - 1 else "")])
        lines.append("]")

    block("input", inputs)
    block("output", outputs)
    lines += ["dynamic_batching {", f"  preferred_batch_size: [ {', '.join(map(str, pref))} ]",
              f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}", "}",
              "instance_group [", "  {", f"    count: {int(instance_count)}", f"    kind: {instance_kind}", "  }", "]"]
    for k in sorted(meta):
        if k.startswith("dermfusion."):
            lines += ["parameters {", f"  key: {_q(k)}", f"  value: {{ string_value: {_q(meta[k])} }}", "}"]
    return "\n".join(lines) + "\n"


def write_triton_repository(onnx_path: str | Path, out: str | Path, model_name: str = "dermfusion",
                            max_batch_size: int = 32, **config_kwargs) -> Path:
    """Create ``<out>/<model_name>/{config.pbtxt, 1/model.onnx}``; returns the model directory."""
    if not _NAME_OK.match(model_name):
        raise ValueError(f"model name {model_name!r}: use letters, digits, '_', '-', '.' only")
    onnx_path = Path(onnx_path)
    model_dir = Path(out) / model_name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    text = triton_config(onnx_path, model_name, max_batch_size, **config_kwargs)
    target = version_dir / "model.onnx"
    if onnx_path.resolve() != target.resolve():
        shutil.copyfile(onnx_path, target)
        data = onnx_path.with_name(onnx_path.name + ".data")
        if data.exists():
            shutil.copyfile(data, version_dir / data.name)
    (model_dir / "config.pbtxt").write_text(text)
    return model_dir


# ------------------------------------------------------------------------------------------ pbtxt parser
_TOKEN = re.compile(r"""\s*(?:(\#[^\n]*)|("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|([{}\[\]:,;<>])|([^\s{}\[\]:,;<>"'#]+))""")


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"pbtxt: cannot parse at offset {pos}: {text[pos:pos + 30]!r}")
        pos = m.end()
        if m.group(1):
            continue
        out.append(next(g for g in m.groups()[1:] if g is not None))
    return out


def _scalar(tok: str) -> Any:
    if tok[0] in "\"'":
        import codecs

        return codecs.escape_decode(tok[1:-1].encode("utf-8"))[0].decode("utf-8")
    if tok in {"true", "True"}:
        return True
    if tok in {"false", "False"}:
        return False
    try:
        return int(tok)
    except ValueError:
        try:
            return float(tok)
        except ValueError:
            return tok  # an enum value such as TYPE_FP32


class _Parser:
    def __init__(self, tokens: list[str]):
        self.t, self.i = tokens, 0

    def peek(self):
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self, expect: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expect is not None and tok != expect):
            raise ValueError(f"pbtxt: expected {expect or 'a token'} at token {self.i}, got {tok!r}")
        self.i += 1
        return tok

    def message(self, close: str | None) -> dict:
        fields: dict[str, list] = {}
        while True:
            tok = self.peek()
            if tok is None:
                if close is not None:
                    raise ValueError("pbtxt: unexpected end of input")
                break
            if tok == close:
                self.take()
                break
            if tok in {",", ";"}:
                self.take()
                continue
            name = self.take()
            if self.peek() == ":":
                self.take()
            fields.setdefault(name, []).extend(self.value())
        return fields

    def value(self) -> list:
        tok = self.peek()
        if tok in {"{", "<"}:
            self.take()
            return [self.message("}" if tok == "{" else ">")]
        if tok == "[":
            self.take()
            items = []
            while self.peek() != "]":
                if self.peek() == ",":
                    self.take()
                    continue
                items.extend(self.value())
            self.take("]")
            return items
        return [_scalar(self.take())]


def parse_pbtxt(text: str) -> dict[str, list]:
    """Parse protobuf text format into ``{field: [values…]}`` (every field a list; messages are dicts)."""
    return _Parser(_tokens(text)).message(None)
