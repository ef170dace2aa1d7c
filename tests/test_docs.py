"""The reading guide docs/how-it-works.md stays true to the code: every backticked `module.qualname` it cites
resolves to an object defined in that module (not one it merely imports), and every section it cites in the
reference notes exists."""
import importlib
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "how-it-works.md"
MODULES = ("util", "flux2", "weights", "vae", "text_encoder", "lora", "offload", "planner", "data", "models",
           "train", "sample",
           "bench")
FILE_SUFFIXES = {"py", "md", "safetensors", "json", "jsonl", "png", "pt", "txt"}   # `train.py` is a file, not code
REF = re.compile(rf"^({'|'.join(MODULES)})((?:\.[A-Za-z_]\w*)+)$")


def code_references(text: str) -> list[tuple[str, str]]:
    """(module, qualname) of every backticked span that names an object of one of our modules."""
    out = []
    for span in re.findall(r"`([^`\n]+)`", text):
        m = REF.match(span.strip())
        if m and m.group(2).rsplit(".", 1)[-1] not in FILE_SUFFIXES:
            out.append((m.group(1), m.group(2)[1:]))
    return out


def resolve(module: str, qualname: str):
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)     # class attributes (properties, methods) resolve on the class itself
    home = getattr(obj, "__module__", module) if callable(obj) else module
    if home != module:               # a name the module imports: cite it where it is defined
        raise AttributeError(f"defined in {home}, not {module}")
    return obj


def headings(path: Path) -> set[str]:
    """Section numbers of a notes file: '## 2. X' -> '2', '### 2.7 X' -> '2.7'."""
    nums = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", line)
        if m:
            nums.add(m.group(1))
    return nums


def test_guide_code_references_resolve():
    refs = code_references(GUIDE.read_text(encoding="utf-8"))
    assert len(refs) >= 30, f"only {len(refs)} code references found"
    assert {m for m, _ in refs} >= {"flux2", "weights", "vae", "text_encoder", "lora", "offload", "data", "models",
                                    "train", "sample"}
    broken = []
    for module, qualname in sorted(set(refs)):
        try:
            resolve(module, qualname)
        except AttributeError as e:
            broken.append(f"{module}.{qualname}: {e}")
    assert not broken, "docs/how-it-works.md cites names the code lacks:\n" + "\n".join(broken)


@pytest.mark.parametrize("cited, notes", [
    (r"(?:flux2_reference\.md|[Rr]eference)", "flux2_reference.md"),
    (r"(?:docs/)?offload(?:\.md)?", "offload.md"),
    (r"(?:bench/)?RESULTS\.md", "../bench/RESULTS.md"),
])
def test_guide_section_citations_exist(cited, notes):
    """'reference §2.7', 'flux2_reference.md §5.4, §6', 'offload §4', 'bench/RESULTS.md §3' name real headings."""
    text = GUIDE.read_text(encoding="utf-8")
    have = headings((ROOT / "docs" / notes).resolve())
    missing = []
    for m in re.finditer(rf"\b{cited} (§[\d.]+[A-Z]?(?:(?:, | and )§?[\d.]+[A-Z]?)*)", text):
        for sec in re.findall(r"(\d+(?:\.\d+)*)", m.group(1)):
            if sec not in have:
                missing.append(f"{m.group(0)!r}: §{sec}")
    assert not missing, f"docs/how-it-works.md cites sections {notes} lacks: {missing}"


def test_code_reference_parser():
    text = "see `flux2.Flux2.forward`, `train.py`, `lora.safetensors`, `torch.compile` and `offload.prepare`"
    assert code_references(text) == [("flux2", "Flux2.forward"), ("offload", "prepare")]


def test_resolve_refuses_imported_names(monkeypatch):
    """A name a module only imports is cited where it is defined."""
    user = types.ModuleType("user_of_flux2")
    user.empirical_mu = importlib.import_module("flux2").empirical_mu     # as `from flux2 import empirical_mu`
    monkeypatch.setitem(sys.modules, "user_of_flux2", user)
    assert resolve("flux2", "empirical_mu") is user.empirical_mu
    with pytest.raises(AttributeError, match="defined in flux2"):
        resolve("user_of_flux2", "empirical_mu")
