"""The container images of the k8s manifests: docker/cpu.Dockerfile and docker/gpu.Dockerfile.

Checked offline, without building (no network, no daemon needed): each Dockerfile parses (a
small parser of Dockerfile instructions below: line continuations, comments, exec and shell
forms); its base image is pinned by tag; its COPY sources exist and are not dropped by
.dockerignore; it COPYs every top-level package of pyproject.toml and configs/ to the same place
under the WORKDIR as in a checkout, and the WORKDIR is the pods' workingDir; it RUNs
launcher/install.sh (CPU mode with the CPU torch index; CUDA mode on the GPU image) after
COPYing every file install.sh reads; its ENV and ARG set no credential-like name or value; it
ends as a non-root user. The GPU base is a CUDA runtime image of the CUDA version of the pinned
torch's PyPI build; both images use the same Python minor. The Makefile's image-cpu / image-gpu
targets build them under the tags that k8s/components/cpu and k8s/components/gpu run, and
.dockerignore keeps run outputs, shards, caches, .git and shared data out of the context.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    tomllib = None

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKER = REPO_ROOT / "docker"
HARDWARE = ["cpu", "gpu"]
INSTALL_SH = "launcher/install.sh"
# Where the k8s pod templates run the job (their workingDir).
POD_TEMPLATES = [REPO_ROOT / "k8s" / "indexed-job" / "base" / "job.yaml",
                 REPO_ROOT / "k8s" / "pytorchjob" / "base" / "pytorchjob.yaml"]

# The CUDA version of the torch build that `pip install torch==<pin>` gets from PyPI on Linux,
# by torch minor. torch 2.13.0's PyPI wheel requires cuda-toolkit==13.0.3 (its metadata), and
# fbgemm-gpu 1.8.0's PyPI wheel links libcudart.so.13. Bumping the torch pin fails
# test_gpu_base_is_the_cuda_runtime_of_the_pinned_torch until this and the GPU base move with it.
PYPI_TORCH_CUDA = {"2.13": "13.0"}

CREDENTIAL_NAME = re.compile(r"AWS_|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY", re.I)
CREDENTIAL_VALUE = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),          # an AWS access key id
    re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"),  # user:password@ in a URL
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b(ghp|gho|ghs|github_pat|glpat|hf|xox[abp])_[A-Za-z0-9_]{16,}"),
]

# Files that a COPYed folder must bring into the image (.dockerignore may drop the rest).
CODE_SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".toml", ".txt", ".cfg"}

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
                "MAINTAINER"}


# ------------------------------------------------------------------------------ the parser


class DockerfileError(ValueError):
    pass


@dataclass
class Instruction:
    cmd: str        # upper case: FROM, RUN, ...
    args: str       # the rest of the (joined) line
    line: int       # where it starts, 1-based

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        """``--flag=value`` options and the remaining words (exec form: the JSON array)."""
        words = json_array(self.args)
        if words is None:
            words = shlex.split(self.args, posix=True)
        flags: dict[str, str] = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        return flags, words


def json_array(text: str) -> list[str] | None:
    text = text.strip()
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """The instructions of a Dockerfile (default escape character ``\\``; no heredocs).

    Comment lines (``#`` first on the line, also inside a continued instruction) and blank lines
    are skipped; a trailing ``\\`` continues the instruction on the next line. Unknown
    instructions, a continuation that never ends, a missing FROM or an instruction without
    arguments are errors."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = n
        if raw.rstrip().endswith("\\"):
            buf.append(raw.rstrip()[:-1])
            continue
        buf.append(raw)
        line, buf = " ".join(part.strip() for part in buf).strip(), []
        if not line:
            continue
        cmd, _, args = line.partition(" ")
        if cmd.upper() not in INSTRUCTIONS:
            raise DockerfileError(f"line {start}: unknown instruction {cmd!r}")
        if not args.strip():
            raise DockerfileError(f"line {start}: {cmd.upper()} without arguments")
        out.append(Instruction(cmd.upper(), args.strip(), start))
    if buf:
        raise DockerfileError(f"line {start}: the file ends inside a continued instruction")
    firsts = [i.cmd for i in out if i.cmd != "ARG"][:1]
    if firsts != ["FROM"]:
        raise DockerfileError("the first instruction (after ARGs) must be FROM")
    return out


def dockerfile(hardware: str) -> list[Instruction]:
    return parse_dockerfile((DOCKER / f"{hardware}.Dockerfile").read_text())


def env_and_args(instructions: list[Instruction]) -> dict[str, str]:
    """Every name an ENV or ARG sets, with its value ('' for an ARG without a default)."""
    out: dict[str, str] = {}
    for ins in instructions:
        if ins.cmd == "ENV":
            words = shlex.split(ins.args)
            if len(words) >= 2 and "=" not in words[0]:  # legacy form: ENV NAME value
                out[words[0]] = " ".join(words[1:])
                continue
            for word in words:
                name, eq, value = word.partition("=")
                assert eq, f"line {ins.line}: ENV {word!r} has no value"
                out[name] = value
        elif ins.cmd == "ARG":
            name, _, value = ins.args.partition("=")
            out[name.strip()] = value.strip().strip('"')
    return out


def copies(instructions: list[Instruction]) -> list[tuple[Instruction, list[str], str]]:
    """(instruction, sources, destination) of each COPY / ADD."""
    out = []
    for ins in instructions:
        if ins.cmd in ("COPY", "ADD"):
            flags, words = ins.flags_and_words()
            assert "from" not in flags, f"line {ins.line}: COPY --from (a multi-stage copy) is not expected"
            assert len(words) >= 2, f"line {ins.line}: {ins.cmd} needs a source and a destination"
            out.append((ins, words[:-1], words[-1]))
    return out


def final_workdir(instructions: list[Instruction]) -> str:
    workdirs = [i.args for i in instructions if i.cmd == "WORKDIR"]
    assert workdirs, "no WORKDIR"
    assert workdirs[-1].startswith("/"), "the WORKDIR should be absolute"
    return workdirs[-1]


def copied_paths(instructions: list[Instruction]) -> dict[str, str]:
    """Repository path -> path in the image, relative to the WORKDIR, of everything COPYed, with
    Docker's rules: a folder's contents go into the destination folder; a file goes into it (a
    destination ending in "/", ".", or several sources) or becomes it."""
    workdir = Path(final_workdir(instructions))
    out: dict[str, str] = {}
    for ins, sources, dest in copies(instructions):
        into_dir = dest.endswith("/") or dest in (".", "..") or len(sources) > 1
        dest_path = Path(dest) if dest.startswith("/") else workdir / dest
        for src in sources:
            src = src.rstrip("/")
            target = dest_path / Path(src).name if (REPO_ROOT / src).is_file() and into_dir else dest_path
            target = Path(os.path.normpath(target))
            assert target.is_relative_to(workdir), f"line {ins.line}: COPY {src} outside the WORKDIR"
            out[src] = target.relative_to(workdir).as_posix()
    return out


# ------------------------------------------------------------------- .dockerignore matching


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(is_exception, regex) for each line of .dockerignore, as Docker reads them: relative to
    the context root, ``*`` and ``?`` within one path element, ``**`` any number of them."""
    out = []
    for raw in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = pattern.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            elif pattern[i] == "[":
                j = pattern.index("]", i)
                regex += pattern[i:j + 1]
                i = j + 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        out.append((negate, re.compile(regex + r"\Z")))
    return out


def ignored(rel: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether .dockerignore drops ``rel`` (or a folder above it) from the build context."""
    parts = rel.strip("/").split("/")
    result = False
    for negate, regex in patterns:
        for k in range(1, len(parts) + 1):
            if regex.match("/".join(parts[:k])):
                result = not negate
                break
    return result


def tracked_files(under: str) -> list[str]:
    """The files git tracks under ``under`` (all files there where git is missing)."""
    git = shutil.which("git")
    if git and (REPO_ROOT / ".git").exists():
        proc = subprocess.run([git, "-C", str(REPO_ROOT), "ls-files", "--", under],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode == 0:
            return proc.stdout.split()
    base = REPO_ROOT / under
    files = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
    return [str(p.relative_to(REPO_ROOT)) for p in files if "__pycache__" not in p.parts]


# ---------------------------------------------------------------------------- the parser itself


def test_the_parser_reads_continuations_comments_and_both_forms():
    text = ("# a comment\nARG BASE=python:3.11.13-slim\nFROM ${BASE}\n"
            "RUN echo a \\\n  # a comment inside\n  && echo b\n"
            'CMD ["python", "-m", "launcher"]\nCOPY --chown=1:1 a b ./\n')
    ins = parse_dockerfile(text)
    assert [i.cmd for i in ins] == ["ARG", "FROM", "RUN", "CMD", "COPY"]
    assert ins[2].args == "echo a && echo b" and ins[2].line == 4
    assert ins[3].flags_and_words() == ({}, ["python", "-m", "launcher"])
    assert ins[4].flags_and_words() == ({"chown": "1:1"}, ["a", "b", "./"])


@pytest.mark.parametrize("text", ["FROM x\nRUNN echo\n", "FROM x\nRUN echo \\\n", "RUN echo\n",
                                  "FROM x\nRUN\n"])
def test_the_parser_rejects_broken_dockerfiles(text):
    with pytest.raises(DockerfileError):
        parse_dockerfile(text)


def test_the_dockerignore_matcher_follows_docker_semantics():
    pats = [(False, re.compile(r"runs\Z")), (False, re.compile(r"(?:.*/)?__pycache__\Z"))]
    assert ignored("runs", pats) and ignored("runs/a/metrics.json", pats)
    assert ignored("shards/__pycache__/x.pyc", pats)
    assert not ignored("recsys_dist/runs.py", pats) and not ignored("x/runs", pats)


# ---------------------------------------------------------------------------- each Dockerfile


@pytest.mark.parametrize("hardware", HARDWARE)
def test_dockerfile_parses_and_pins_its_base_image(hardware):
    ins = dockerfile(hardware)
    froms = [i for i in ins if i.cmd == "FROM"]
    assert len(froms) == 1, "one stage"
    image = froms[0].args.split()[0]
    assert "$" not in image, "the base image is named literally"
    name_tag = image.split("@", 1)[0]
    assert ":" in name_tag.rsplit("/", 1)[-1], f"{image}: pin the base image by tag"
    tag = name_tag.rsplit(":", 1)[1]
    assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{image}: a version tag, not {tag!r}"
    assert any(i.cmd == "CMD" or i.cmd == "ENTRYPOINT" for i in ins)


@pytest.mark.parametrize("hardware", HARDWARE)
def test_copy_sources_exist_and_reach_the_context(hardware):
    patterns = dockerignore_patterns()
    for ins, sources, _ in copies(dockerfile(hardware)):
        for src in sources:
            assert not Path(src).is_absolute() and ".." not in Path(src).parts, \
                f"line {ins.line}: {src} is outside the build context"
            assert (REPO_ROOT / src).exists(), f"line {ins.line}: COPY source {src} does not exist"
            files = tracked_files(src.rstrip("/"))
            assert files, f"line {ins.line}: {src} holds no tracked file"
            # a file named by COPY, and every code or config file of a folder, reaches the
            # image (results such as benchmarks/out/*.md are dropped on purpose)
            dropped = [f for f in files if ignored(f, patterns)
                       and ((REPO_ROOT / src).is_file() or Path(f).suffix in CODE_SUFFIXES)]
            assert not dropped, f"line {ins.line}: .dockerignore drops {dropped[:5]} of {src}"


def top_level_packages() -> list[str]:
    """The packages pyproject.toml installs (its packages.find include patterns), as folders."""
    text = (REPO_ROOT / "pyproject.toml").read_text()
    if tomllib is not None:
        include = tomllib.loads(text)["tool"]["setuptools"]["packages"]["find"]["include"]
    else:  # pragma: no cover
        include = re.findall(r'"([\w*]+)"', re.search(r"include\s*=\s*\[(.*?)\]", text).group(1))
    return sorted({p.rstrip("*").rstrip(".") for p in include})


@pytest.mark.parametrize("hardware", HARDWARE)
def test_copies_what_the_job_reads_where_a_checkout_has_it(hardware):
    ins = dockerfile(hardware)
    paths = copied_paths(ins)
    packages = top_level_packages()
    assert set(packages) >= {"launcher", "recsys_dist", "shards"}
    for top in packages + ["configs"]:
        assert (REPO_ROOT / top).is_dir()
        assert paths.get(top) == top, f"{hardware}: COPY {top}/ {top}/ (to the same path under the WORKDIR)"
    # the files the editable install and `launcher` read at the repository root
    for f in ("pyproject.toml", "requirements.txt", "README.md"):
        assert paths.get(f) == f, f"{hardware}: COPY {f}"
    # the pods' workingDir is the image's repository root
    workdir = final_workdir(ins)
    for template in POD_TEMPLATES:
        assert f"workingDir: {workdir}" in template.read_text(), template


def install_sh_inputs() -> list[str]:
    """The repository files launcher/install.sh reads ("$here/<path>"), itself included."""
    text = (REPO_ROOT / INSTALL_SH).read_text()
    found = set(re.findall(r'"\$here/([\w./-]+)"', text)) | {INSTALL_SH}
    return sorted(f for f in found if (REPO_ROOT / f).is_file())


@pytest.mark.parametrize("hardware", HARDWARE)
def test_runs_launcher_install_sh_after_copying_its_inputs(hardware):
    ins = dockerfile(hardware)
    runs = [i for i in ins if i.cmd == "RUN" and INSTALL_SH in i.args]
    assert len(runs) == 1, f"{hardware}: RUN bash {INSTALL_SH} once"
    run = runs[0]
    assert re.search(rf"\bbash {re.escape(INSTALL_SH)}\b", run.args)
    copied_before: dict[str, str] = {}
    for i in ins:
        if i is run:
            break
        if i.cmd == "COPY":
            copied_before.update(copied_paths([x for x in ins if x.cmd == "WORKDIR"] + [i]))
    inputs = install_sh_inputs()
    assert {"requirements.txt", "pyproject.toml", "launcher/fbgemm_gpu_shim/pyproject.toml"} <= set(inputs)
    for f in inputs:
        assert copied_before.get(f) == f, f"{hardware}: {f} (read by install.sh) is not COPYed before it runs"
    # the mode: CPU (the shim + torchrec --no-deps) with torch's CPU wheels, or CUDA
    if hardware == "cpu":
        assert "RECSYS_DIST_CUDA=0" in run.args
        assert env_and_args(ins).get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
        assert "TORCH_INDEX_URL" in run.args
        assert "2.13.0+cpu" in run.args, "the CPU torch build is checked after the install"
    else:
        assert "RECSYS_DIST_CUDA=1" in run.args
    # and the venv is the one on PATH
    env = env_and_args(ins)
    assert env["PATH"].startswith(env["RECSYS_DIST_VENV"] + "/bin:")


def test_install_sh_cuda_mode_installs_the_pinned_cuda_packages():
    """The GPU image relies on install.sh's RECSYS_DIST_CUDA=1 branch: the CUDA fbgemm-gpu of
    the same version as fbgemm-gpu-cpu, torchrec of the same pin as the CPU branch."""
    text = (REPO_ROOT / INSTALL_SH).read_text()
    req = (REPO_ROOT / "requirements.txt").read_text()
    (fbgemm,) = re.findall(r"^fbgemm-gpu-cpu==([\w.]+)$", req, re.M)
    cuda, cpu = text.split('if [ "$cuda" = 1 ]; then', 1)[1].split("else", 1)
    assert f"fbgemm-gpu=={fbgemm}" in cuda and "/^fbgemm-gpu-cpu/d" in cuda
    (torchrec,) = set(re.findall(r"torchrec==([\w.]+)", text))
    (cuda_line,) = [line for line in cuda.splitlines() if f"torchrec=={torchrec}" in line]
    assert "--no-deps" not in cuda_line, "the CUDA branch installs torchrec with its dependencies"
    assert f"--no-deps torchrec=={torchrec}" in cpu
    assert 'RECSYS_DIST_VENV:-' in text, "install.sh takes the venv from RECSYS_DIST_VENV"


@pytest.mark.parametrize("hardware", HARDWARE)
def test_sets_no_credentials(hardware):
    ins = dockerfile(hardware)
    for name, value in env_and_args(ins).items():
        assert not CREDENTIAL_NAME.search(name), f"{hardware}: ENV/ARG {name}"
        for pattern in CREDENTIAL_VALUE:
            assert not pattern.search(value), f"{hardware}: ENV/ARG {name} holds a credential"
    text = (DOCKER / f"{hardware}.Dockerfile").read_text()
    for pattern in CREDENTIAL_VALUE:
        assert not pattern.search(text), f"{hardware}.Dockerfile holds something like a credential"
    assert not re.search(r"\bAWS_[A-Z_]+=", text), f"{hardware}.Dockerfile assigns an AWS_ variable"
    # nor copies credential files into the image
    for _, sources, _ in copies(ins):
        for src in sources:
            assert not re.search(r"(^|/)(\.aws|\.env|\.ssh|\.netrc|credentials)(/|$)", src), src


@pytest.mark.parametrize("hardware", HARDWARE)
def test_runs_as_a_non_root_user(hardware):
    ins = dockerfile(hardware)
    users = [i for i in ins if i.cmd == "USER"]
    assert users, f"{hardware}: no USER (the image would run as root)"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), f"{hardware}: USER {users[-1].args}"
    created = " ".join(i.args for i in ins if i.cmd == "RUN" and "useradd" in i.args)
    assert re.search(rf"--uid {user}\b", created) or re.search(rf"\b{user}\b", created), \
        f"{hardware}: USER {user} is not created by a RUN useradd"
    cmd = max(n for n, i in enumerate(ins) if i.cmd in ("CMD", "ENTRYPOINT"))
    assert ins.index(users[-1]) < cmd


def base_image(hardware: str) -> str:
    return [i for i in dockerfile(hardware) if i.cmd == "FROM"][0].args.split()[0]


def test_gpu_base_is_the_cuda_runtime_of_the_pinned_torch():
    req = (REPO_ROOT / "requirements.txt").read_text()
    (torch,) = re.findall(r"^torch==(\d+\.\d+)\.\d+$", req, re.M)
    assert torch in PYPI_TORCH_CUDA, f"torch {torch}: which CUDA does its PyPI build use? (PYPI_TORCH_CUDA)"
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu\d+\.\d+", base_image("gpu"))
    assert m, f"{base_image('gpu')}: an nvidia/cuda <version>-runtime image"
    assert f"{m.group(1)}.{m.group(2)}" == PYPI_TORCH_CUDA[torch]
    # and the image checks what pip installed: that torch build, the pinned CUDA packages
    text = (DOCKER / "gpu.Dockerfile").read_text()
    assert f"startswith('{PYPI_TORCH_CUDA[torch]}')" in text
    (torchrec,) = set(re.findall(r"torchrec==([\w.]+)", (REPO_ROOT / INSTALL_SH).read_text()))
    (fbgemm,) = re.findall(r"^fbgemm-gpu-cpu==([\w.]+)$", req, re.M)
    (deepspeed,) = re.findall(r"^deepspeed==([\w.]+)$", req, re.M)
    assert f"{{'torchrec': '{torchrec}', 'fbgemm-gpu': '{fbgemm}', 'deepspeed': '{deepspeed}'}}" in text, \
        "the GPU image checks the installed versions against the pins"


def test_both_images_use_the_same_python():
    m = re.fullmatch(r"python:(\d+\.\d+)\.\d+-slim-\w+", base_image("cpu"))
    assert m, f"{base_image('cpu')}: a python:<x.y.z>-slim image"
    gpu = (DOCKER / "gpu.Dockerfile").read_text()
    assert f"python{m.group(1)}-venv" in gpu and f"PYTHON=python{m.group(1)}" in gpu


# ---------------------------------------------------------------------- tags, make, context


def component_image(hardware: str) -> str:
    k = yaml.safe_load((REPO_ROOT / "k8s" / "components" / hardware / "kustomization.yaml").read_text())
    (image,) = k["images"]
    return f"{image['name']}:{image['newTag']}"


def make_targets() -> dict[str, str]:
    """Makefile target -> its recipe (the lines after ``target:``)."""
    out, target = {}, None
    for line in (REPO_ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([\w.-]+):", line)
        if m:
            target = m.group(1)
            out[target] = ""
        elif line.startswith("\t") and target:
            out[target] += line.strip() + "\n"
        elif not line.strip():
            target = None
    return out


@pytest.mark.parametrize("hardware", HARDWARE)
def test_make_builds_the_tag_the_manifests_run(hardware):
    recipe = make_targets()[f"image-{hardware}"]
    assert recipe.strip() == f"docker build -f docker/{hardware}.Dockerfile -t {component_image(hardware)} ."
    # the image the pods run is that one (kustomize's images: on the base's `image: recsys-dist`)
    for template in POD_TEMPLATES:
        assert re.search(r"image: recsys-dist\s", template.read_text())
    phony = re.search(r"^\.PHONY:(.*)$", (REPO_ROOT / "Makefile").read_text(), re.M).group(1).split()
    assert f"image-{hardware}" in phony


def test_dockerignore_keeps_outputs_caches_and_data_out():
    patterns = dockerignore_patterns()
    for path in (".git/config", "runs/x/metrics.json", "shards_out/ml-1m/manifest.json",
                 "benchmarks/out/x.md", "shared/datasets/ml-1m/ratings.dat", "recsys_dist/__pycache__/a.pyc",
                 "recsys_dist.egg-info/PKG-INFO", ".pytest_cache/v", ".env", ".aws/credentials",
                 "launcher/fbgemm_gpu_shim/build/lib/x"):
        assert ignored(path, patterns), f".dockerignore should drop {path}"
    for path in ("configs/datasets/ml1m.yaml", "launcher/install.sh", "benchmarks/_common.py",
                 "shards/build.py", "README.md"):
        assert not ignored(path, patterns), f".dockerignore should keep {path}"
