"""Feature Fréchet distance on the built-in digits: teacher vs sCT vs sCD at given step budgets.

The measurement of issue 10 (a benchmark, not a test). The feature space is the penultimate layer
of a small CNN classifier trained here on a fixed split of the built-in digits (scmctl's copy of
the UCI optdigits, upsampled to 16x16 as the tiny preset does); its held-out accuracy is printed so
a weak feature space is visible. The classifier only ever sees the real digits, never generated
images. Its weights are cached in ``--cache DIR`` (state dict + split, loaded with weights_only)
and reused when the file is there.

For each model: 2,000 generated images (seeds 0..1999) against all 1,797 digits:
- FD: the Fréchet distance of Gaussian fits (``scmctl.metrics.fid.compute_stats`` and
  ``frechet_distance``, float64);
- precision / recall with k = 3 (``scmctl.metrics.prdc.precision_recall``, Kynkäänniemi et al. 2019);
- ratio: FD over the teacher's FD at its default sampler (tiny: Heun, 18 steps = 35 NFE);
- copies: the fraction of images closer (pixel L2) to their nearest training digit than 95% of the
  training digits are to their nearest other one: memorization shows here before it shows in FD
  (a target that averages over the whole training set, loss.sct_references, could invite it).
Consistency models are scored at 1 and 2 steps (2-step t_mid: the checkpoint's ``sample.t_mid``,
1.1 in the paper, or each of ``--tmid-grid``). A row "data (2,000 resampled)" gives the floor: FD of
2,000 digits drawn with replacement against all of them.

Training goes through scmctl's own CLI (``python -m scmctl train/distill``, the commands a user
runs), in ``--work DIR``: ``teacher-N``, and the students in ``from-TEACHER/{sct,scd}-N``
(``sct-TAG-N`` with ``--tag``); re-running resumes, so a finished run is only evaluated.
``--teacher/--sct/--scd PATH`` evaluate given checkpoints or run directories instead of training.
Students start from the teacher's EMA weights (sCT: ``--init``, sCD: ``--teacher``), as in issue 10;
``sct-scratch`` is issue 10's from-scratch road: sCT from scratch for the teacher's and the student's
steps together (``work/sct-scratch-N``; ``--set-sct`` applies to it too).
``--first-seed`` scores another set of seeds (the FD's spread between sample sets).

    # the issue's budgets (hours on 2 CPU cores):
    python benchmarks/digits_fd.py --cache /tmp/digits-fd --work /tmp/digits-runs \\
        --teacher-steps 6000 --student-steps 5000
    # a short run, and a suspect (sCT with dropout 0.2) against the same teacher:
    python benchmarks/digits_fd.py --cache /tmp/digits-fd --work /tmp/digits-runs \\
        --teacher-steps 2000 --student-steps 1000 --methods sct,scd
    python benchmarks/digits_fd.py --cache /tmp/digits-fd --work /tmp/digits-runs --teacher-steps 2000 \\
        --student-steps 1000 --methods sct --tag drop02 --set-sct network.dropout=0.2
    # the same total budget from scratch, against sCT from the teacher:
    python benchmarks/digits_fd.py --cache /tmp/digits-fd --work /tmp/digits-runs \\
        --teacher-steps 6000 --student-steps 5000 --methods sct,sct-scratch
    # evaluate checkpoints only, with a 2-step t_mid grid, as JSON:
    python benchmarks/digits_fd.py --cache /tmp/digits-fd --teacher runs/tiny-diffusion \\
        --sct runs/tiny-sct --tmid-grid 0.8,1.0,1.1,1.3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from scmctl.generation import open_generator  # noqa: E402
from scmctl.metrics.detectors import Detector  # noqa: E402
from scmctl.metrics.fid import compute_stats, frechet_distance  # noqa: E402
from scmctl.metrics.prdc import K, precision_recall  # noqa: E402

RESOLUTION = 16          # the tiny preset's data.resolution
HELD_OUT = 360           # digits kept out of the classifier's training (20%)
SPLIT_SEED = 0
CLASSIFIER_FILE = "digits_classifier.pt"
CLASSIFIER_VERSION = 1   # bump when the architecture or its training changes
FEATURE_DIM = 128


# --------------------------------------------------------------------------------------------
# The feature space: a small classifier on the real digits
# --------------------------------------------------------------------------------------------

class DigitsClassifier(nn.Module):
    """uint8 (N, 1, 16, 16) -> logits (N, 10); ``features`` is the 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)    # 16 -> 8
        self.conv3 = nn.Conv2d(64, 64, 3, stride=2, padding=1)    # 8 -> 4
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0
        x = F.silu(self.conv1(x))
        x = F.silu(self.conv2(x))
        x = F.silu(self.conv3(x))
        return F.silu(self.fc(x.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class DigitsDetector(Detector):
    """The classifier's penultimate features as a :class:`scmctl.metrics.detectors.Detector`."""

    name = "digits-classifier"

    def __init__(self, classifier: DigitsClassifier, weights: Path | None = None):
        super().__init__("cpu")
        self.classifier = classifier.eval()
        self.weights = weights
        self.feature_dim = FEATURE_DIM

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images[:, :1])  # the base class expanded grayscale to 3


def digits_uint8() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as uint8 (N, 1, 16, 16) and their labels, exactly as the tiny preset trains on."""
    from scmctl.data.datasets import load_digits

    data = load_digits(RESOLUTION)
    return data.images, data.labels


def split_indices(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices of a fixed random split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[HELD_OUT:], perm[:HELD_OUT]


def _shifted(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translations by up to 1 pixel (the classifier should not key on exact positions)."""
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_classifier(epochs: int = 30, batch: int = 64, seed: int = 0) -> tuple[DigitsClassifier, float]:
    """Train on the split's training part; return the network and its held-out accuracy."""
    images, labels = digits_uint8()
    train_idx, held_idx = split_indices(len(images))
    torch.manual_seed(seed)
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        for i in range(0, len(order), batch):
            b = order[i:i + batch]
            loss = F.cross_entropy(net(_shifted(images[b], g)), labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return net.eval(), accuracy(net, images[held_idx], labels[held_idx])


@torch.no_grad()
def accuracy(net: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((net.eval()(images).argmax(1) == labels).double().mean())


def load_or_train_classifier(cache: Path) -> tuple[DigitsDetector, float]:
    """The cached classifier in ``cache`` (trained and saved there when missing) and its held-out accuracy."""
    from scmctl.fileio import write_atomic

    path = cache / CLASSIFIER_FILE
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("version") == CLASSIFIER_VERSION:
            net = DigitsClassifier()
            net.load_state_dict(state["net"])
            return DigitsDetector(net.eval(), path), float(state["held_out_accuracy"])
    net, acc = train_classifier()
    cache.mkdir(parents=True, exist_ok=True)
    state = {"version": CLASSIFIER_VERSION, "net": net.state_dict(), "held_out_accuracy": acc,
             "split_seed": SPLIT_SEED, "held_out": HELD_OUT, "resolution": RESOLUTION}

    def save(f):
        torch.save(state, f)

    write_atomic(path, save)
    return DigitsDetector(net, path), acc


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------

def features_of(detector: Detector, images_nchw: torch.Tensor, batch: int = 500) -> np.ndarray:
    return torch.cat([detector.features(images_nchw[i:i + batch])
                      for i in range(0, len(images_nchw), batch)]).numpy().astype(np.float64)


def nearest_distances(images: torch.Tensor, train: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """Pixel L2 distance of each image to its nearest training digit (float64, 0..255 scale)."""
    a, b = images.flatten(1).double(), train.flatten(1).double()
    d2 = (a.square().sum(1)[:, None] - 2 * a @ b.T + b.square().sum(1)[None, :]).clamp_min(0)
    if exclude_self:
        d2.fill_diagonal_(float("inf"))
    return d2.min(dim=1).values.sqrt()


COPY_QUANTILE = 0.05


class Reference:
    """Features and Gaussian statistics of all 1,797 digits, and the pixel distance below which an
    image counts as a near-copy of a training digit."""

    def __init__(self, detector: Detector):
        self.detector = detector
        self.images = digits_uint8()[0]
        self.features = features_of(detector, self.images)
        self.mu, self.sigma = compute_stats(self.features)
        self.copy_distance = float(torch.quantile(nearest_distances(self.images, self.images, exclude_self=True),
                                                  COPY_QUANTILE))

    def score(self, images_nchw: torch.Tensor) -> dict:
        f = features_of(self.detector, images_nchw)
        mu, sigma = compute_stats(f)
        p, r = precision_recall(f, self.features, k=K)
        copies = float((nearest_distances(images_nchw, self.images) < self.copy_distance).double().mean())
        return {"fd": frechet_distance(mu, sigma, self.mu, self.sigma), "precision": p, "recall": r,
                "copies": copies}


def generated_images(model: str, n: int, first_seed: int = 0, **settings) -> tuple[torch.Tensor, dict]:
    """n images (seeds first_seed..first_seed+n-1) as uint8 NCHW, and the generator's info."""
    gen = open_generator(model, device="cpu", **settings)
    images = np.concatenate(list(gen.batches(range(first_seed, first_seed + n), batch=250)))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), gen.info


def resampled_data(n: int, seed: int = 0) -> torch.Tensor:
    images = digits_uint8()[0]
    return images[torch.randint(len(images), (n,), generator=torch.Generator().manual_seed(seed))]


# --------------------------------------------------------------------------------------------
# Training through the CLI
# --------------------------------------------------------------------------------------------

def run_cli(args: list[str], log: Path) -> float:
    """Run ``python -m scmctl ARGS`` (this checkout first on the path); wall seconds. Output goes to ``log``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "scmctl", *args]
    print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        sys.exit(f"scmctl {' '.join(args[:1])} failed (exit {rc}); see {log}")
    return time.perf_counter() - t0


def _sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def train_models(a) -> tuple[dict, dict]:
    """{name: checkpoint or run dir} and {name: training wall seconds} (None: given, not trained)."""
    models, walls = {}, {}
    work = Path(a.work) if a.work else None
    if a.teacher:
        models["teacher"], walls["teacher"] = a.teacher, None
    else:
        if work is None or a.teacher_steps is None:
            sys.exit("give --teacher PATH, or --work DIR and --teacher-steps N to train one")
        d = work / f"teacher-{a.teacher_steps}"
        walls["teacher"] = run_cli(["train", "--preset", a.preset, "--objective", "diffusion", "--steps",
                                    str(a.teacher_steps), "--run-dir", str(d), *_sets(a.set_teacher)],
                                   d.with_suffix(".log"))
        models["teacher"] = str(d)
    for method in a.methods:
        given = getattr(a, method.replace("-", "_"))
        name = f"{method}-{a.tag}" if a.tag else method
        if given:
            models[name], walls[name] = given, None
            continue
        if work is None or a.student_steps is None:
            sys.exit(f"give --{method} PATH, or --work DIR and --student-steps N to train it")
        extra = _sets(a.set_student + (a.set_scd if method == "scd" else a.set_sct))
        if method == "sct-scratch":  # the teacher's and the student's steps together, no teacher
            if a.teacher_steps is None:
                sys.exit("sct-scratch trains --teacher-steps + --student-steps: give --teacher-steps")
            steps = a.teacher_steps + a.student_steps
            d, cmd = work / f"{name}-{steps}", ["train", "--preset", a.preset]
        else:
            steps, d = a.student_steps, work / f"from-{Path(models['teacher']).stem}" / f"{name}-{a.student_steps}"
            if method == "sct":
                cmd = ["train", "--preset", a.preset, "--init", models["teacher"]]
            else:
                cmd = ["distill", "--preset", a.preset, "--teacher", models["teacher"]]
        walls[name] = run_cli([*cmd, "--steps", str(steps), "--run-dir", str(d), *extra], d.with_suffix(".log"))
        models[name] = str(d)
    return models, walls


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

class ScoreCache:
    """Scores already computed, in ``--cache DIR/scores.json``, keyed by the checkpoint's sha256, the
    sampler settings and n: re-running a table (or sharing a teacher between tables) costs nothing."""

    def __init__(self, cache: Path):
        self.path = cache / "scores.json"
        self.scores = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @staticmethod
    def key(info: dict, n: int, first_seed: int) -> str:
        return json.dumps([CLASSIFIER_VERSION, info["checkpoint_sha256"], info["steps"], info["t_mid"],
                           info["solver"], info["weights"], n, first_seed])

    def get(self, info: dict, n: int, first_seed: int) -> dict | None:
        return self.scores.get(self.key(info, n, first_seed))

    def put(self, info: dict, n: int, first_seed: int, score: dict) -> None:
        from scmctl.fileio import write_atomic

        if self.path.is_file():  # another benchmark process may have added scores meanwhile
            self.scores = {**json.loads(self.path.read_text()), **self.scores}
        self.scores[self.key(info, n, first_seed)] = score
        write_atomic(self.path, lambda f: f.write(json.dumps(self.scores, indent=1)), binary=False)


def evaluate(models: dict, walls: dict, ref: Reference, n: int, first_seed: int, tmid_grid: list[float] | None,
             cache: ScoreCache) -> list[dict]:
    rows = []

    def add(name, images, info, seconds):
        s = ref.score(images) if images is not None else cache.get(info, n, first_seed)
        if info and images is not None:
            cache.put(info, n, first_seed, s)
        rows.append({"model": name, "steps": info.get("steps"), "nfe": info.get("nfe"),
                     "t_mid": info.get("t_mid"), **s, "train_s": walls.get(name), "eval_s": seconds,
                     "checkpoint": info.get("checkpoint")})
        print(f"  {name} {info.get('nfe')} NFE t_mid={info.get('t_mid')}: FD {s['fd']:.3f}", file=sys.stderr,
              flush=True)

    t0 = time.perf_counter()
    add(f"data ({n:,} resampled)", resampled_data(n, seed=first_seed), {}, time.perf_counter() - t0)
    for name, model in models.items():
        settings = [{}] if name == "teacher" else [{"steps": 1}] + (
            [{"steps": 2, "t_mid": t} for t in tmid_grid] if tmid_grid else [{"steps": 2}])
        for kw in settings:
            t0 = time.perf_counter()
            info = open_generator(model, device="cpu", **kw).info
            hit = cache.get(info, n, first_seed)
            cached = hit is not None and "copies" in hit  # scores from before the copies column: redo
            images = None if cached else generated_images(model, n, first_seed, **kw)[0]
            add(name, images, info, time.perf_counter() - t0)
    teacher_fd = next(r["fd"] for r in rows if r["model"] == "teacher")
    for r in rows:
        r["ratio"] = r["fd"] / teacher_fd
    return rows


def print_table(rows: list[dict], accuracy_held_out: float, n: int) -> None:
    print(f"feature FD on the built-in digits (16x16): {n} samples vs all 1,797 digits; classifier "
          f"held-out accuracy {accuracy_held_out:.4f} ({HELD_OUT} digits); precision/recall k={K}")
    head = f"{'model':24} {'NFE':>4} {'t_mid':>6} {'FD':>8} {'/teacher':>8} {'prec':>6} {'recall':>6} " \
           f"{'copies':>6} {'train s':>8} {'eval s':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        t_mid = f"{r['t_mid']:.3f}" if r["t_mid"] is not None else "-"
        train_s = f"{r['train_s']:.0f}" if r["train_s"] is not None else "-"
        nfe = r["nfe"] if r["nfe"] is not None else "-"
        print(f"{r['model']:24} {nfe:>4} {t_mid:>6} {r['fd']:8.3f} {r['ratio']:8.3f} {r['precision']:6.3f} "
              f"{r['recall']:6.3f} {r['copies']:6.3f} {train_s:>8} {r['eval_s']:7.1f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="folder for the classifier's weights (trained once)")
    p.add_argument("--work", help="folder for the training runs (re-running resumes them)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--teacher-steps", type=int)
    p.add_argument("--student-steps", type=int)
    p.add_argument("--methods", default="sct,scd",
                   help="models to train/evaluate besides the teacher, comma-separated: sct, scd (from the "
                        "teacher), sct-scratch (sCT from scratch for teacher + student steps)")
    p.add_argument("--teacher", help="evaluate this teacher checkpoint / run dir instead of training one")
    p.add_argument("--sct", help="evaluate this sCT checkpoint / run dir instead of training one")
    p.add_argument("--scd", help="evaluate this sCD checkpoint / run dir instead of training one")
    p.add_argument("--sct-scratch", help="evaluate this from-scratch sCT checkpoint / run dir instead")
    p.add_argument("--tag", help="suffix of the students' run names (a variant: sct-TAG)")
    p.add_argument("--set-teacher", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--set-student", action="append", default=[], metavar="KEY=VALUE", help="both students")
    p.add_argument("--set-sct", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--set-scd", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tmid-grid", help="2-step t_mid values to score, comma-separated (default: the config's)")
    p.add_argument("-n", type=int, default=2000, help="generated samples per score (default 2000)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first..first+n-1 (another value: a second sample set, for the FD's spread)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    a = p.parse_args(argv)
    a.methods = [m for m in a.methods.split(",") if m]
    if any(m not in ("sct", "scd", "sct-scratch") for m in a.methods):
        p.error("--methods: any of sct, scd, sct-scratch")
    a.tmid_grid = [float(t) for t in a.tmid_grid.split(",")] if a.tmid_grid else None
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    t0 = time.perf_counter()
    detector, acc = load_or_train_classifier(Path(a.cache))
    print(f"classifier: held-out accuracy {acc:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    models, walls = train_models(a)
    rows = evaluate(models, walls, Reference(detector), a.n, a.first_seed, a.tmid_grid, ScoreCache(Path(a.cache)))
    if a.json:
        print(json.dumps({"n": a.n, "first_seed": a.first_seed, "reference": "all 1797 digits",
                          "classifier_held_out_accuracy": acc,
                          "k": K, "rows": rows}))
    else:
        print_table(rows, acc, a.n)


if __name__ == "__main__":
    from scmctl.errors import UsageError

    try:
        main()
    except UsageError as e:  # a wrong path or setting: one line, exit 2, as the CLI does
        print(f"digits_fd.py: {e}", file=sys.stderr)
        sys.exit(2)
