"""Running the official DiffuRec and DreamRec code in this process, from checkouts kept outside
this repository (nothing of them is copied here): their modules are imported from the folder
given, unchanged, and their datasets are built from the plain files in the data dir (no pickle
is ever loaded). Used by ``train_eval_throughput.py`` and ``dreamrec_official_curve.py``.

- DreamRec (baiyimeng/DreamRec @ f77206d, the folder holding ``dreamrec.py``, ``sasrec.py``,
  ``utils.py``, ``run_dreamrec.py``): :func:`import_dreamrec`, :func:`dreamrec_args` (the
  defaults of ``run_dreamrec.parse_args()``), the Zhihu splits from
  ``zhihu/raw/dreamrec/*_data.tsv.gz`` (:func:`load_split`) handed to the official
  ``RecDataset`` as a :class:`Frame`; ``run_dreamrec`` is imported with ``pandas`` stubbed
  (:func:`pandas_stub`: it only needs pandas for its pickle reader, in a ``__main__`` never run).
- DiffuRec (WHUIR/DiffuRec @ f6f70c9, the checkout root or its ``src/``): :func:`import_diffurec`
  (``utils``, ``model``, ``trainer``, with ``diffurec`` and ``step_sample``), :func:`diffurec_args`
  (``main.py``'s own ``argparse`` statements, executed alone: importing ``main.py`` would parse
  ``sys.argv``, create ``log/`` and set ``CUDA_VISIBLE_DEVICES``), :func:`ml1m_sequences` (the
  ``dataset.pkl`` dict rebuilt from ``ml-1m/raw/diffurec/interactions.tsv.gz``, which is that
  pickle's row-by-row conversion), :func:`build_diffurec` (``main.py``'s model construction),
  :func:`diffurec_train_step` / :func:`diffurec_test_pass` (the bodies of ``trainer.py``'s
  train loop and test loop). One runtime patch, no file edited: ``step_sample.py:115`` uses
  ``dtype=np.int`` (removed in numpy 1.24), so :func:`numpy_int_alias` sets ``np.int = int``
  while the model is built, and takes it away again.

The two checkouts share module names (``utils``): :func:`imported_from` imports a set of names
from one folder and takes them out of ``sys.modules`` again, so each caller holds its own
module objects and the other checkout's imports are not served from the cache.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gzip
import importlib
import json
import random
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

DREAMREC_MODULES = ("utils", "sasrec", "dreamrec", "run_dreamrec")
DIFFUREC_MODULES = ("step_sample", "diffurec", "utils", "model", "trainer")


# ---------------------------------------------------------------------------------------------
# importing from a checkout

def checkout_dir(folder, files: tuple[str, ...], what: str, option: str) -> Path:
    """``folder`` resolved, holding ``files``, outside this repository; else SystemExit naming ``option``."""
    path = Path(folder).expanduser().resolve()
    if path.is_relative_to(REPO):
        raise SystemExit(f"{option} must be outside this repository (the official code is not copied into it)")
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise SystemExit(f"{option} {folder}: no {', '.join(missing)} there (export {what})")
    return path


@contextlib.contextmanager
def _isolated_names(names):
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    try:
        yield
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def imported_from(folder: Path, names: tuple[str, ...], stub_pandas_for: tuple[str, ...] = ()):
    """The modules ``names`` imported (in that order) from ``folder`` alone, as a namespace.

    While they import, ``folder`` is first on ``sys.path`` and any cached module of the same
    name is set aside; afterwards the names leave ``sys.modules`` (the modules stay alive in
    the namespace returned) and the cache is restored. Each module's file is checked to be in
    ``folder``."""
    folder = Path(folder).resolve()
    mods = {}
    with _isolated_names(names):
        sys.path.insert(0, str(folder))
        try:
            for n in names:
                with pandas_stub() if n in stub_pandas_for else contextlib.nullcontext():
                    mods[n] = importlib.import_module(n)
        finally:
            sys.path.remove(str(folder))
    for n, mod in mods.items():
        if Path(mod.__file__).resolve().parent != folder:
            raise SystemExit(f"imported {n} from {mod.__file__}, not from {folder}")
    return types.SimpleNamespace(**mods)


@contextlib.contextmanager
def pandas_stub():
    """``import pandas`` yields a stub while the official run script is imported (it only needs
    pandas for its pickle reader in its ``__main__``, which is never run)."""
    saved = sys.modules.get("pandas")
    stub = types.ModuleType("pandas")

    def read_pickle(*_a, **_k):
        raise RuntimeError("this benchmark never unpickles data")
    stub.read_pickle = read_pickle
    sys.modules["pandas"] = stub
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop("pandas", None)
        else:
            sys.modules["pandas"] = saved


@contextlib.contextmanager
def numpy_int_alias():
    """``np.int = int`` for the block (DiffuRec's ``step_sample.py`` needs it), then as before."""
    import numpy as np

    had = "int" in np.__dict__
    old = np.__dict__.get("int")
    np.int = int
    try:
        yield
    finally:
        if had:
            np.int = old
        else:
            del np.int


def set_seeds(seed: int) -> None:
    """What both official scripts seed (DiffuRec main.py ``fix_random_seed_as``, DreamRec
    utils.py ``setup_seed``): python, numpy and torch."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# DreamRec (baiyimeng/DreamRec @ f77206d) on Zhihu

DREAMREC_FILES = ("dreamrec.py", "sasrec.py", "utils.py", "run_dreamrec.py")
DREAMREC_WHAT = "baiyimeng/DreamRec @ f77206d"


def import_dreamrec(folder, option: str = "--official"):
    """``(utils, dreamrec, run_dreamrec)`` imported from the DreamRec checkout ``folder``."""
    path = checkout_dir(folder, DREAMREC_FILES, DREAMREC_WHAT, option)
    m = imported_from(path, DREAMREC_MODULES, stub_pandas_for=("run_dreamrec",))
    return m.utils, m.dreamrec, m.run_dreamrec


def dreamrec_args(run_script, data_dir: Path, seed: int | None = None) -> argparse.Namespace:
    """``run_dreamrec.parse_args()``'s defaults for ``--data zhihu``, plus what its ``__main__``
    adds (``seq_size``, ``item_num`` from ``data_statis``; here ``data_statis.json``)."""
    argv, sys.argv = sys.argv, ["run_dreamrec.py", "--data", "zhihu"]
    try:
        oargs = run_script.parse_args()
    finally:
        sys.argv = argv
    statis = json.loads((Path(data_dir) / "data_statis.json").read_text())
    oargs.seq_size, oargs.item_num = int(statis["seq_size"]), int(statis["item_num"])
    if seed is not None:
        oargs.seed = seed
    return oargs


def zhihu_dir(data_root) -> Path:
    """The DreamRec Zhihu files under a data root (or the folder itself if it holds them)."""
    root = Path(data_root)
    return root / "zhihu" / "raw" / "dreamrec" if (root / "zhihu").is_dir() else root


def load_split(data_dir: Path, split: str, max_rows: int | None = None):
    """The rows of ``<split>_data.tsv.gz`` as an (n, 3) object array: (seq int64[10], len_seq, next)
    (the first ``max_rows`` rows when given)."""
    import numpy as np

    rows = []
    with gzip.open(Path(data_dir) / f"{split}_data.tsv.gz", "rt") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != ["seq", "len_seq", "next"]:
            raise ValueError(f"{split}_data.tsv.gz: unexpected header {header}")
        for line in f:
            if max_rows is not None and len(rows) >= max_rows:
                break
            seq, len_seq, nxt = line.rstrip("\n").split("\t")
            rows.append((np.array(seq.split(), dtype=np.int64), int(len_seq), int(nxt)))
    out = np.empty((len(rows), 3), dtype=object)
    for i, r in enumerate(rows):
        out[i, 0], out[i, 1], out[i, 2] = r
    return out


class Frame:
    """What the official ``RecDataset(df)`` asks of a DataFrame: ``to_numpy()``."""

    def __init__(self, array):
        self.array = array

    def to_numpy(self):
        return self.array

    def __len__(self):
        return len(self.array)


def dreamrec_model_and_optimizer(dreamrec, oargs, device):
    """``run_dreamrec.py:65-68``: the model and its AdamW (``setup_seed`` comes first, :43)."""
    import torch

    model = dreamrec.DreamRec(oargs).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=oargs.lr, weight_decay=oargs.l2_decay, eps=1e-8)
    return model, optimizer


# ---------------------------------------------------------------------------------------------
# DiffuRec (WHUIR/DiffuRec @ f6f70c9) on ML-1M

DIFFUREC_FILES = ("main.py", "utils.py", "model.py", "trainer.py", "diffurec.py", "step_sample.py")
DIFFUREC_WHAT = "WHUIR/DiffuRec @ f6f70c9"


def diffurec_src(folder, option: str = "--official-diffurec") -> Path:
    """The folder of DiffuRec's modules: ``folder/src`` (a checkout root) or ``folder`` itself."""
    f = Path(folder)
    return checkout_dir(f / "src" if (f / "src" / "main.py").is_file() else f, DIFFUREC_FILES, DIFFUREC_WHAT, option)


def import_diffurec(folder, option: str = "--official-diffurec"):
    """DiffuRec's ``step_sample``, ``diffurec``, ``utils``, ``model``, ``trainer`` (a namespace)."""
    return imported_from(diffurec_src(folder, option), DIFFUREC_MODULES)


def diffurec_args(folder, argv: list[str], option: str = "--official-diffurec") -> argparse.Namespace:
    """``main.py``'s arguments: its ``parser = argparse.ArgumentParser()`` and every
    ``parser.add_argument(...)`` statement, executed unchanged and alone, then ``parse_args(argv)``."""
    path = diffurec_src(folder, option) / "main.py"
    tree = ast.parse(path.read_text(), str(path))
    keep = []
    for node in tree.body:
        call = node.value if isinstance(node, (ast.Assign, ast.Expr)) else None
        if not isinstance(call, ast.Call):
            continue
        func = ast.unparse(call.func)
        if (isinstance(node, ast.Assign) and func == "argparse.ArgumentParser"
                and [ast.unparse(t) for t in node.targets] == ["parser"]) or \
                (isinstance(node, ast.Expr) and func == "parser.add_argument"):
            keep.append(node)
    if len(keep) < 10 or not isinstance(keep[0], ast.Assign):
        raise SystemExit(f"{path}: its argparse statements are not where {DIFFUREC_WHAT} has them")
    ns = {"argparse": argparse}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), ns)  # noqa: S102 - its own parser
    return ns["parser"].parse_args(argv)


def ml1m_sequences(path) -> dict:
    """DiffuRec's ``dataset.pkl`` for ML-1M rebuilt from its conversion ``interactions.tsv.gz``
    (columns user, item, pos, split, raw_user_id, raw_item_id): ``train`` / ``val`` / ``test``
    ``{user_idx: [item_idx, ...]}`` in ``pos`` order and ``smap`` ``{raw_item_id: item_idx}``
    (``main.py`` uses only these four, and ``len(smap)`` as ``item_num``)."""
    raw = {"train": {}, "val": {}, "test": {}}
    smap, pos = {}, {}
    with gzip.open(path, "rt") as f:
        header = f.readline().rstrip("\n").split("\t")
        want = ["user", "item", "pos", "split", "raw_user_id", "raw_item_id"]
        if header != want:
            raise ValueError(f"{path}: header {header}, expected {want}")
        for line in f:
            user, item, p, split, _raw_user, raw_item = line.rstrip("\n").split("\t")
            u, i, p = int(user), int(item), int(p)
            if pos.setdefault(u, -1) >= p:
                raise ValueError(f"{path}: user {u}'s positions are not increasing at {p}")
            pos[u] = p
            raw[split].setdefault(u, []).append(i)
            smap[int(raw_item)] = i
    return {**raw, "smap": smap}


def build_diffurec(mods, args, device):
    """``main.py:155-156``: ``Att_Diffuse_model(create_model_diffu(args), args)`` (``np.int``
    aliased while it is built), moved to ``device`` as ``trainer.model_train`` does."""
    with numpy_int_alias():
        model = mods.model.Att_Diffuse_model(mods.model.create_model_diffu(args), args)
    return model.to(device)


def diffurec_train_step(model_joint, optimizer, train_batch, device) -> None:
    """The body of ``trainer.model_train``'s batch loop (trainer.py:96-108), less its progress
    print every ``len(loader) / 5 + 1`` batches (a ``loss.item()`` and a print)."""
    train_batch = [x.to(device) for x in train_batch]
    optimizer.zero_grad()
    scores, diffu_rep, weights, t, item_rep_dis, seq_rep_dis = model_joint(train_batch[0], train_batch[1],
                                                                           train_flag=True)
    loss_diffu_value = model_joint.loss_diffu_ce(diffu_rep, train_batch[1])
    loss_all = loss_diffu_value
    loss_all.backward()
    optimizer.step()


def diffurec_test_pass(mods, model_joint, test_data_loader, metric_ks, device) -> dict:
    """``trainer.model_train``'s test loop (trainer.py:155-173) on ``model_joint`` in eval mode
    (what its best model is whenever validation ran): per batch the reverse diffusion
    (``train_flag=False``), the full-catalog scores, ``topk(100)`` and ``hrs_and_ndcgs_k``; then
    the mean of each metric in %. Also ``num_users``: the rows scored."""
    import numpy as np
    import torch

    model_joint.eval()
    n = 0
    top_100_item = []
    with torch.no_grad():
        test_metrics_dict = {'HR@5': [], 'NDCG@5': [], 'HR@10': [], 'NDCG@10': [], 'HR@20': [], 'NDCG@20': []}
        for test_batch in test_data_loader:
            test_batch = [x.to(device) for x in test_batch]
            scores_rec, rep_diffu, _, _, _, _ = model_joint(test_batch[0], test_batch[1], train_flag=False)
            scores_rec_diffu = model_joint.diffu_rep_pre(rep_diffu)
            _, indices = torch.topk(scores_rec_diffu, k=100)
            top_100_item.append(indices)
            metrics = mods.trainer.hrs_and_ndcgs_k(scores_rec_diffu, test_batch[1], metric_ks)
            for k, v in metrics.items():
                test_metrics_dict[k].append(v)
            n += test_batch[0].shape[0]
    out = {k: float(round(np.mean(v) * 100, 4)) for k, v in test_metrics_dict.items() if v}
    out["num_users"] = n
    return out
