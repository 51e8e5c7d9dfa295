"""Encodings files: edgequant's own versioned JSON, and AIMET's 1.0.0 format.

edgequant format (``"format": "edgequant.encodings"``, ``"version": 1``)::

    {"format": "edgequant.encodings", "version": 1,
     "activations": {"<tensor name>": Encoding.to_dict(), ...},
     "params":      {"<module>.weight": Encoding.to_dict(), ...}}

Names are the sim's tensor names: ``<module>.weight`` for weights, the producing module's name (or
``<scope>.<op>`` for functional ops, the argument name for model inputs) for activations.

AIMET 1.0.0 keeps lists of ``{"name", "dtype": "INT", "enc_type", "bw", "is_sym", "scale": [...],
"offset": [...]}``. AIMET counts integers on the unsigned grid ``[0, 2**bw - 1]`` and writes
``offset = -(unsigned zero point)``; a signed grid's ``zero_point`` maps to the unsigned one by adding
``2**(bw-1)``. This module is the only place that converts between the two conventions.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from ..core.encoding import Encoding
from ..core.granularity import PerBlock, PerChannel, PerTensor

FORMAT = "edgequant.encodings"
VERSION = 1
AIMET_VERSION = "1.0.0"


def file_mode() -> int:
    """The permissions a new file gets under the user's umask (``0o666 & ~umask``)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    write_files_together({path: lambda tmp: Path(tmp).write_text(text)})


def write_files_together(writers: Mapping) -> None:
    """Write several files so that they are replaced together or not at all.

    ``writers`` maps each target path to ``write(tmp_path)``. Every file is first written to a
    temporary file beside its target; only when all are written are the targets replaced (old ones
    kept aside until every rename has succeeded, and put back if one fails). Files get the
    permissions of the user's umask.
    """
    targets = [Path(p) for p in writers]
    for p in targets:
        if not p.parent.is_dir():
            raise FileNotFoundError(f"cannot write {p}: folder {p.parent} does not exist")
        if p.is_dir():
            raise IsADirectoryError(f"cannot write {p}: it is a folder; give a file name")
    tmps, backups, done = {}, {}, []
    try:
        for p, write in zip(targets, writers.values()):
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
            os.close(fd)
            tmps[p] = tmp
            write(tmp)
            os.chmod(tmp, file_mode())
        for p in targets:
            if p.exists():
                fd, bak = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".old")
                os.close(fd)
                os.replace(p, bak)
                backups[p] = bak
            os.replace(tmps.pop(p), p)
            done.append(p)
    except BaseException:
        for p in done:  # roll back what was already replaced
            if p in backups:
                os.replace(backups.pop(p), p)
            else:
                p.unlink(missing_ok=True)
        for p, bak in backups.items():
            if not p.exists():
                os.replace(bak, p)
        raise
    finally:
        for tmp in list(tmps.values()) + [b for b in backups.values() if os.path.exists(b)]:
            if os.path.exists(tmp):
                os.unlink(tmp)


def replace_folder(folder, write) -> None:
    """Write a whole folder: ``write(tmp)`` fills a fresh folder beside ``folder``, which then replaces
    it (the old one is removed only after the swap). A failure leaves the old folder as it was."""
    folder = Path(folder)
    parent = folder.resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {folder}: folder {parent} does not exist")
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"cannot write {folder}: it is a file, not a folder")
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{folder.name}.", suffix=".tmp"))
    old = None
    try:
        write(tmp)
        os.chmod(tmp, file_mode() | ((file_mode() & 0o444) >> 2))  # a folder: x where r
        if folder.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{folder.name}.", suffix=".old"))
            os.rmdir(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException:
        if old is not None and old.exists() and not folder.exists():
            os.replace(old, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def to_edgequant(activations: Mapping[str, Encoding], params: Mapping[str, Encoding]) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "activations": {k: e.to_dict() for k, e in activations.items()},
        "params": {k: e.to_dict() for k, e in params.items()},
    }


def _unsigned_offset(enc: Encoding) -> int:
    return -2 ** (enc.bits - 1) if enc.signed else 0


def to_aimet(activations: Mapping[str, Encoding], params: Mapping[str, Encoding]) -> dict:
    def entry(name, e: Encoding):
        d = {
            "name": name,
            "dtype": "INT",
            "enc_type": {PerTensor: "PER_TENSOR", PerChannel: "PER_CHANNEL", PerBlock: "PER_BLOCK"}[type(e.granularity)],
            "bw": e.bits,
            "is_sym": e.symmetric,
            "scale": e.scale.reshape(-1).tolist(),
            # unsigned zero point = zero_point - qmin of the full grid; AIMET's offset is its negative
            "offset": [float(-(z - _unsigned_offset(e))) for z in e.zero_point.reshape(-1).tolist()],
        }
        if isinstance(e.granularity, PerBlock):
            d["block_size"] = e.granularity.block_size
        return d

    return {
        "version": AIMET_VERSION,
        "activation_encodings": [entry(k, e) for k, e in activations.items()],
        "param_encodings": [entry(k, e) for k, e in params.items()],
        "excluded_layers": [],
        "quantizer_args": {},
    }


def read_encodings(source) -> tuple[dict, str]:
    """Load a file path or a dict; returns ``(document, where)`` for error messages."""
    if isinstance(source, Mapping):
        return dict(source), "encodings"
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"encodings file {path} does not exist")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON encodings file ({e}); re-export it with sim.save_encodings") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: an encodings file must hold a JSON object")
    return doc, str(path)


def parse_encodings(doc: dict, where: str, like: Mapping[str, Encoding | None]) -> tuple[dict, dict]:
    """Parse either format into ``({name: Encoding}, {name: Encoding})`` (activations, params).

    ``like`` maps each known name to this sim's quantizer spec (as an Encoding template or None): AIMET
    files do not say whether a grid is signed, so their offsets are converted with the sim's signedness.
    """
    if doc.get("format") == FORMAT:
        if doc.get("version") != VERSION:
            raise ValueError(f"{where}: encodings version {doc.get('version')!r}; this edgequant reads version {VERSION}")
        out = []
        for section in ("activations", "params"):
            entries = doc.get(section)
            if not isinstance(entries, dict):
                raise ValueError(f"{where}: '{section}' must be an object of name -> encoding")
            out.append({k: Encoding.from_dict(v, where=f"{where}: {section}[{k!r}]") for k, v in entries.items()})
        return out[0], out[1]
    if str(doc.get("version", "")).startswith("1."):
        return _parse_aimet(doc, where, like)
    raise ValueError(f"{where}: not an encodings file (expected 'format': '{FORMAT}' or an AIMET 'version': '1.0.0')")


def _parse_aimet(doc, where, like):
    out = []
    for section in ("activation_encodings", "param_encodings"):
        entries = doc.get(section, [])
        if not isinstance(entries, list):
            raise ValueError(f"{where}: '{section}' must be a list")
        parsed = {}
        for i, d in enumerate(entries):
            w = f"{where}: {section}[{i}]"
            if not isinstance(d, dict) or "name" not in d:
                raise ValueError(f"{w}: each entry needs a 'name'")
            name = d["name"]
            w = f"{where}: {section}[{i}] ({name!r})"
            template = like.get(name)
            if template is None:
                raise ValueError(f"{w}: no quantizer of this sim is called {name!r}")
            if d.get("dtype", "INT") != "INT":
                raise ValueError(f"{w}: dtype {d.get('dtype')!r} is not supported (only INT)")
            try:
                bits = int(d["bw"])
                scale = torch.tensor([float(v) for v in d["scale"]])
                offset = [float(v) for v in d["offset"]]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{w}: malformed entry ({e})") from None
            if any(o != int(o) for o in offset):
                raise ValueError(f"{w}: offsets must be integers")
            signed = template.signed
            shift = -2 ** (bits - 1) if signed else 0
            zp = torch.tensor([int(-o) + shift for o in offset], dtype=torch.int32)
            shape = template.scale.shape
            if scale.numel() != template.scale.numel() or zp.numel() != scale.numel():
                raise ValueError(f"{w}: {scale.numel()} scales for a quantizer that has {template.scale.numel()}")
            try:
                enc = Encoding(scale.reshape(shape), zp.reshape(shape), bits=bits, signed=signed,
                               symmetric=bool(d.get("is_sym", False)), narrow_range=template.narrow_range,
                               granularity=template.granularity)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{w}: {e}") from None
            if not (torch.isfinite(enc.scale).all() and (enc.scale > 0).all()):
                raise ValueError(f"{w}: every scale must be finite and > 0")
            parsed[name] = enc
        out.append(parsed)
    return out[0], out[1]
