"""The Dockerfiles under docker/: their pins equal pyproject.toml, and a small rule check (no hadolint here).

The images themselves are built only where Docker exists (docker/README.md); these checks need nothing.
"""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
sys.path.insert(0, str(DOCKER))
import pins  # noqa: E402


# ------------------------------------------------------------------------------------------- parsing

@dataclass
class Instruction:
    line: int
    op: str
    args: str


@dataclass
class Stage:
    base: str  # with global ARG defaults substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def ops(self, op: str) -> list[Instruction]:
        return [i for i in self.instructions if i.op == op]


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]
    instructions: list[Instruction]

    def arg(self, name: str) -> str:
        for i in self.instructions:
            if i.op == "ARG":
                key, _, value = i.args.partition("=")
                if key.strip() == name and value:
                    return value.strip().strip('"')
        raise KeyError(f"{self.path.name}: no ARG {name} with a default")


def parse(path: Path) -> Dockerfile:
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment lines inside a continued instruction
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append((start, buf + line))
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    instructions = []
    for n, text in logical:
        op, _, args = text.strip().partition(" ")
        instructions.append(Instruction(n, op.upper(), args.strip()))
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.op == "ARG" and not stages:
            key, _, value = ins.args.partition("=")
            global_args[key.strip()] = value.strip().strip('"')
        elif ins.op == "FROM":
            words = ins.args.split()
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1)) or m.group(0), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif stages:
            stages[-1].instructions.append(ins)
    return Dockerfile(path, global_args, stages, instructions)


def pip_installs(ins: Instruction) -> list[list[str]]:
    """The argument lists of every `pip install` inside a RUN (split on && and ||)."""
    out = []
    for part in re.split(r"&&|\|\||;", ins.args):
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # leading VAR=value
        for i, w in enumerate(words):
            if w.endswith("pip") and i + 1 < len(words) and words[i + 1] == "install":
                out.append(words[i + 2:])
    return out


_FLAGS_WITH_VALUE = {"-r", "--requirement", "-c", "--constraint", "--index-url", "-i", "--extra-index-url",
                     "-f", "--find-links", "--target", "-t", "--prefix", "--root"}


def package_specs(args: list[str]) -> list[str]:
    """Package arguments of one pip install (flags, their values, requirement files and local paths dropped)."""
    specs, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in _FLAGS_WITH_VALUE:
            skip = True
            continue
        if a.startswith("-"):
            continue
        if a.startswith((".", "/")):  # the project itself, e.g. ".[trainer]"
            continue
        specs.append(a)
    return specs


PARSED = {p.name: parse(p) for p in DOCKERFILES}


def pyproject_pins() -> dict[str, str]:
    out = {}
    for reqs in pins.extras().values():
        for req in reqs:
            name, _, version = req.partition("==")
            out[pins.canonical(name)] = version.strip()
    return out


# ------------------------------------------------------------------------------------------ the files

def test_the_three_images_exist():
    assert set(PARSED) == {"operator.Dockerfile", "trainer-cpu.Dockerfile", "trainer-gpu.Dockerfile"}
    for name in PARSED:
        assert (DOCKER / f"{name}.dockerignore").exists(), f"{name} has no .dockerignore"


# ---------------------------------------------------------------------------------------------- pins

def test_gpu_image_pins_match_pyproject():
    df, pp = PARSED["trainer-gpu.Dockerfile"], pyproject_pins()
    assert df.arg("MEGATRON_CORE_VERSION") == pp["megatron-core"]
    assert df.arg("MEGABLOCKS_VERSION") == pp["megablocks"]
    assert df.arg("FLASH_ATTN_VERSION") == pp["flash-attn"]


def test_gpu_image_uses_a_recent_ngc_pytorch_base():
    base = PARSED["trainer-gpu.Dockerfile"].stages[-1].base
    m = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d\d)\.(\d\d)-py3(@sha256:[a-f0-9]{64})?", base)
    assert m, base
    # 25.01 is the first NGC PyTorch release on torch 2.6.
    assert (int(m.group(1)), int(m.group(2))) >= (25, 1), f"{base}: torch < 2.6"


def test_gpu_image_keeps_the_base_torch():
    text = (DOCKER / "trainer-gpu.Dockerfile").read_text()
    assert "--exclude torch" in text
    for ins in PARSED["trainer-gpu.Dockerfile"].stages[-1].ops("RUN"):
        for args in pip_installs(ins):
            assert not any(pins.name_of(s) == "torch" for s in package_specs(args)), f"line {ins.line} installs torch"
            if "." in args:
                assert "--no-deps" in args, f"line {ins.line}: the project must be installed with --no-deps"


def test_cpu_image_torch_matches_pyproject_and_comes_from_the_cpu_index():
    df = PARSED["trainer-cpu.Dockerfile"]
    assert df.arg("TORCH_VERSION") == pyproject_pins()["torch"]
    assert df.arg("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"


def test_python_base_images_match_requires_python():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", requires).groups())
    for name in ("operator.Dockerfile", "trainer-cpu.Dockerfile"):
        for stage in PARSED[name].stages:
            m = re.fullmatch(r"python:(\d+)\.(\d+)\.\d+-slim(-\w+)?(@sha256:[a-f0-9]{64})?", stage.base)
            assert m, f"{name}: {stage.base}"
            assert (int(m.group(1)), int(m.group(2))) >= minimum


def test_operator_image_has_no_torch():
    text = (DOCKER / "operator.Dockerfile").read_text()
    for ins in PARSED["operator.Dockerfile"].instructions:
        if ins.op == "RUN":
            for args in pip_installs(ins):
                assert all("trainer" not in a and "gpu" not in a for a in args), ins.args
                assert all(pins.name_of(s) != "torch" for s in package_specs(args))
    assert '".[operator]"' in text


# ---------------------------------------------------------------------------------------------- lint

def lint(df: Dockerfile, *, non_root: bool) -> list[str]:
    problems = []
    where = df.path.name
    if not df.instructions or df.instructions[0].op not in ("ARG", "FROM"):
        problems.append(f"{where}: must start with ARG or FROM")
    for stage in df.stages:
        base = stage.base
        if "$" in base:
            problems.append(f"{where}: FROM {base}: base image uses an ARG without a default")
        ref = base.split("@")[0]
        tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else ""
        if not tag and "@sha256:" not in base:
            problems.append(f"{where}: FROM {base}: base image is not pinned by tag or digest")
        if tag == "latest":
            problems.append(f"{where}: FROM {base}: 'latest' is not a pin")
    copied_sources = False
    for ins in df.instructions:
        if ins.op == "ADD":
            problems.append(f"{where}:{ins.line}: use COPY, not ADD")
        if ins.op == "MAINTAINER":
            problems.append(f"{where}:{ins.line}: MAINTAINER is deprecated; use a LABEL")
        if ins.op == "COPY" and re.search(r"(^|\s)(trainer|operator)(\s|$)", ins.args):
            copied_sources = True
        if ins.op != "RUN":
            continue
        if re.search(r"\bcurl\b[^|]*\|\s*(ba)?sh|\bwget\b[^|]*\|\s*(ba)?sh", ins.args):
            problems.append(f"{where}:{ins.line}: piping a download into a shell")
        if re.search(r"\bsudo\b", ins.args):
            problems.append(f"{where}:{ins.line}: sudo in a build")
        if "apt-get install" in ins.args:
            if "--no-install-recommends" not in ins.args:
                problems.append(f"{where}:{ins.line}: apt-get install without --no-install-recommends")
            if "rm -rf /var/lib/apt/lists" not in ins.args:
                problems.append(f"{where}:{ins.line}: apt lists not removed in the same layer")
        pip_cache_mounted = "--mount=type=cache,target=/root/.cache/pip" in ins.args
        for args in pip_installs(ins):
            if "--no-cache-dir" not in args and not pip_cache_mounted:
                problems.append(f"{where}:{ins.line}: pip install without --no-cache-dir or a BuildKit cache mount")
            third_party = package_specs(args)
            for spec in third_party:
                if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[^=<>~*!,\s]+", spec):
                    problems.append(f"{where}:{ins.line}: '{spec}' is not pinned with ==")
            if third_party and copied_sources:
                problems.append(f"{where}:{ins.line}: third-party packages installed after the sources were "
                                "copied (every source edit would reinstall them)")
    users = [i for i in df.stages[-1].instructions if i.op == "USER"] if df.stages else []
    if non_root:
        if not users:
            problems.append(f"{where}: final stage has no USER")
        else:
            user = users[-1].args.split(":")[0]
            if user in ("root", "0") or not user.isdigit():
                problems.append(f"{where}: USER {users[-1].args}: use a numeric non-root UID "
                                "(runAsNonRoot can only verify numeric users)")
            later = [i for i in df.stages[-1].instructions if i.line > users[-1].line and i.op in ("RUN", "COPY")]
            if later:
                problems.append(f"{where}: RUN/COPY after the final USER (line {later[0].line})")
    return problems


@pytest.mark.parametrize("name", sorted(PARSED))
def test_dockerfile_lint(name):
    assert lint(PARSED[name], non_root=name == "operator.Dockerfile") == []


BAD = """\
FROM python:latest
MAINTAINER someone
RUN pip install kopf requests==2.0
COPY operator operator
RUN pip install --no-cache-dir kubernetes==1.0
ADD https://example.com/x.tgz /x
RUN curl -s https://example.com/install | sh
USER root
"""


def test_lint_catches_each_rule(tmp_path):
    p = tmp_path / "bad.Dockerfile"
    p.write_text(BAD)
    problems = "\n".join(lint(parse(p), non_root=True))
    for expected in ("'latest' is not a pin", "MAINTAINER", "pip install without --no-cache-dir",
                     "'kopf' is not pinned", "installed after the sources", "use COPY, not ADD",
                     "piping a download", "numeric non-root UID"):
        assert expected in problems, expected
    assert "requests==2.0" not in problems


def test_lint_wants_a_pinned_base(tmp_path):
    p = tmp_path / "b.Dockerfile"
    p.write_text("ARG BASE\nFROM ${BASE}\nFROM ubuntu\n")
    problems = "\n".join(lint(parse(p), non_root=False))
    assert "ARG without a default" in problems and "FROM ubuntu: base image is not pinned" in problems


# ---------------------------------------------------------------------------------------------- pins.py

def test_pins_requirements_come_from_pyproject():
    lines = pins.requirements(["trainer"], ["torch"])
    pp = pyproject_pins()
    assert lines and all("==" in line for line in lines)
    assert not any(pins.name_of(line) == "torch" for line in lines)
    assert f"megatron-core=={pp['megatron-core']}" in lines


def test_pins_constraints_keep_base_pins_except_ours():
    base = "# NGC\ntorch==2.10.0a0+abc\nnumpy==1.26.4\nTransformers==4.40.0\ntqdm==4.0\n"
    out = pins.constraints(base, ["transformers==5.23.0", "tqdm==4.70.1", "# comment"])
    assert "torch==2.10.0a0+abc" in out and "numpy==1.26.4" in out
    assert "Transformers" not in out and "tqdm" not in out


def test_pins_refuses_unpinned_requirements(tmp_path):
    pp = tmp_path / "pyproject.toml"
    pp.write_text('[project]\nname="x"\ndependencies=["a>=1"]\n')
    with pytest.raises(SystemExit, match="not pinned"):
        pins.requirements(["base"], [], pyproject=pp)
