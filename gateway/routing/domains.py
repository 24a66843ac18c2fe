"""Which domain a request belongs to: one of the tasks the served students were distilled
for, or `general`. A multinomial logistic regression on hashed character 3-5-grams and
words (L2-normalised term frequencies, 2^18 buckets; the hashing trick of Weinberger et
al. 2009, as in scikit-learn's HashingVectorizer), fitted with L-BFGS from scipy on the
tasks' training prompts; `general` learns from the general-knowledge probe and from every
other known task. A prediction whose probability is below the policy's threshold counts
as `general`, so a student only gets requests that clearly look like its task.

Featurising a prompt of a few hundred characters and scoring it takes tens of
microseconds (`bench/routing/decision.py` measures it).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import minimize

GENERAL = "general"
BUCKETS = 1 << 18
NGRAMS = (3, 4, 5)
MAX_CHARS = 2000  # a long prompt's head says what kind of request it is


def features(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Hashed n-gram counts of `text` as (bucket indices, L2-normalised values). The
    n-grams are hashed together in numpy (a polynomial hash of the bytes, then Fibonacci
    hashing into the buckets); words through crc32."""
    text = " " + " ".join(text[:MAX_CHARS].lower().split()) + " "
    data = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.uint64)
    parts = []
    with np.errstate(over="ignore"):  # wrap-around is the hash
        for n in NGRAMS:
            if len(data) < n:
                continue
            h = np.full(len(data) - n + 1, n, dtype=np.uint64)
            for j in range(n):
                h = h * _PRIME + data[j : len(data) - n + 1 + j]
            parts.append((h * _GOLDEN) >> _SHIFT)
    words = [zlib.crc32(w.encode()) & (BUCKETS - 1) for w in text.split()]
    parts.append(np.array(words, dtype=np.uint64))
    idx, counts = np.unique(np.concatenate(parts), return_counts=True)
    val = counts.astype(np.float64)
    return idx.astype(np.int64), val / np.linalg.norm(val)


_PRIME = np.uint64(1_099_511_628_211)  # FNV's 64-bit prime
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SHIFT = np.uint64(64 - (BUCKETS.bit_length() - 1))


def _matrix(texts: Sequence[str]) -> sparse.csr_matrix:
    rows, cols, vals = [], [], []
    for i, text in enumerate(texts):
        idx, val = features(text)
        rows.append(np.full(len(idx), i))
        cols.append(idx)
        vals.append(val)
    return sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(texts), BUCKETS),
    )


@dataclass(frozen=True)
class Detection:
    domain: str  # GENERAL when not confident
    confidence: float
    best: str  # the most likely domain even when not confident


class DomainDetector:
    def __init__(self, domains: Sequence[str], weights: np.ndarray, bias: np.ndarray) -> None:
        self.domains = tuple(domains)
        self.weights = weights  # (domains, BUCKETS), float32
        self.bias = bias

    @classmethod
    def fit(
        cls, examples: Iterable[tuple[str, str]], *, l2: float = 1e-3, max_iter: int = 200
    ) -> DomainDetector:
        """Fit on (text, domain) pairs; domains are the distinct labels, sorted."""
        pairs = list(examples)
        domains = sorted({d for _, d in pairs})
        if len(domains) < 2:
            return cls(domains or [GENERAL], np.zeros((1, BUCKETS), np.float32), np.zeros(1))
        x = _matrix([t for t, _ in pairs])
        y = np.array([domains.index(d) for _, d in pairs])
        k, n = len(domains), len(pairs)
        onehot = np.zeros((n, k))
        onehot[np.arange(n), y] = 1
        used = np.unique(x.indices)  # optimise only the buckets some prompt touches
        xs = x[:, used]

        def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w = theta[: k * len(used)].reshape(k, len(used))
            b = theta[k * len(used) :]
            z = xs @ w.T + b
            z -= z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            nll = -np.log(np.maximum(p[np.arange(n), y], 1e-300)).mean()
            g = (p - onehot) / n
            grad_w = np.asarray((xs.T @ g).T) + l2 * w
            return nll + 0.5 * l2 * float(np.sum(w * w)), np.concatenate(
                [grad_w.ravel(), g.sum(axis=0)]
            )

        theta0 = np.zeros(k * len(used) + k)
        result = minimize(loss, theta0, jac=True, method="L-BFGS-B",
                          options={"maxiter": max_iter})  # fmt: skip
        weights = np.zeros((k, BUCKETS), np.float32)
        weights[:, used] = result.x[: k * len(used)].reshape(k, len(used))
        return cls(domains, weights, result.x[k * len(used) :])

    def probabilities(self, text: str) -> np.ndarray:
        idx, val = features(text)
        z = self.weights[:, idx] @ val + self.bias
        z = np.exp(z - z.max())
        return z / z.sum()

    def detect(self, text: str, min_confidence: float = 0.5) -> Detection:
        if len(self.domains) == 1:
            return Detection(self.domains[0], 1.0, self.domains[0])
        p = self.probabilities(text)
        best = int(np.argmax(p))
        domain = self.domains[best] if p[best] >= min_confidence else GENERAL
        return Detection(domain, float(p[best]), self.domains[best])

    def accuracy(self, examples: Iterable[tuple[str, str]], min_confidence: float = 0.5) -> float:
        pairs = list(examples)
        hits = sum(self.detect(t, min_confidence).domain == d for t, d in pairs)
        return hits / len(pairs) if pairs else float("nan")


def task_examples(domains: Iterable[str], split: str) -> list[tuple[str, str]]:
    """(prompt, domain) pairs from the tasks: each of `domains` under its own name, the
    general-knowledge probe and every other built-in task as `general`. A task without a
    train split (the probe) gives its validation split for training."""
    from models.tasks import get_task, task_names

    wanted = set(domains) - {GENERAL}
    tasks = {name: get_task(name) for name in sorted(wanted | set(task_names()))}
    claimed = _templates([tasks[n] for n in wanted])
    out = []
    for name, task in tasks.items():
        label = name if name in wanted else GENERAL
        if label == GENERAL and _templates([task]) & claimed:
            continue  # a student's task made from traffic of this template: not general
        rows = task.examples(split) or (task.examples("validation") if split == "train" else [])
        out.extend((e.prompt, label) for e in rows)
    return out


def _templates(tasks: Iterable, sample: int = 50) -> set[str]:
    """The template fingerprints of the tasks' first prompts, as the traffic log takes
    them: a task the adaptation loop built from logged traffic may be the very traffic a
    built-in task generates (the benchmark's support tickets), and must not also be
    taught to the detector as general."""
    from gateway.adapt.fingerprint import fingerprint

    found = set()
    for task in tasks:
        rows = task.examples("train", sample) or task.examples("validation", sample)
        found |= {fingerprint([{"role": "user", "content": e.prompt}]) for e in rows}
    return found


def fit_for(domains: Iterable[str]) -> tuple[DomainDetector, float]:
    """A detector for `domains` (plus general) and its accuracy on the tasks' test split."""
    domains = set(domains)
    detector = DomainDetector.fit(task_examples(domains, "train"))
    return detector, detector.accuracy(task_examples(domains, "test"))
