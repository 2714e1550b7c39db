"""Shared fixtures: the tiny random model (seconds) and the real embedded model (slow tier)."""

from __future__ import annotations

import os
from pathlib import Path

# OpenMP's default busy-waiting makes small ops ~100x slower when 2 test workers share 2 cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs 2 workers on 2 cores: one thread each, no oversubscription
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DATA_SETS = (
    "hh-rlhf-harmless",
    "truthfulqa",
    "crows-pairs",
    "realtoxicityprompts",
    "self-instruct-seed",
    "tinyshakespeare",
)


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """Small data files written by us for the tests (tests/fixtures)."""
    return FIXTURES


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The third-party data sets (HH-RLHF, TruthfulQA, CrowS-Pairs, ...) for the real-data tests:
    the directory named by RLHFKIT_TEST_DATA. Unset: those tests skip and say how to run them;
    set to a directory that lacks them: they fail (CI sets it, so they never silently stop running)."""
    where = os.environ.get("RLHFKIT_TEST_DATA")
    if not where:
        pytest.skip("real-data test: set RLHFKIT_TEST_DATA=DIR, a directory holding " + ", ".join(DATA_SETS))
    path = Path(where).expanduser().resolve()
    missing = [d for d in DATA_SETS if not (path / d).is_dir()]
    if missing:
        pytest.fail(f"RLHFKIT_TEST_DATA={where}: {', '.join(missing)} missing", pytrace=False)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): faster, and far faster on a shared, loaded machine
    (OpenMP threads spin-waiting for a busy core made them 10x slower with 2 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from rlhfkit.models.loading import tiny_random_dir

    return str(tiny_random_dir())


@pytest.fixture()
def tiny(tiny_path):
    """A fresh tiny-random LLaMA (fp32, dropout off) and SmolLM2's tokenizer."""
    from rlhfkit.models.loading import load_causal_lm

    torch.manual_seed(0)
    return load_causal_lm(tiny_path)


@pytest.fixture(scope="module")
def lively(tiny_path):
    """tiny-random with its matrices redrawn at std 0.2 (seeded): its greedy answers change with
    every prompt and token by token, so a position off by one, a wrong pad, a dropped key or a
    short cache changes them (the plain tiny model answers the same few tokens to everything)."""
    from rlhfkit.models.loading import load_causal_lm

    loaded = load_causal_lm(tiny_path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return loaded


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from rlhfkit.models.loading import embedded_model_dir

    return str(embedded_model_dir())


@pytest.fixture(scope="session")
def sharp_path(tiny_path, tmp_path_factory) -> str:
    """A directory of the tiny model with its final norm x12: peaked samples with newlines among them
    (the RL smoke tests' synthetic reward, ``helpers.newline_reward``, then has something to find)."""
    from rlhfkit.models.loading import load_causal_lm

    loaded = load_causal_lm(tiny_path)
    with torch.no_grad():
        loaded.model.model.norm.weight.fill_(12.0)
    path = tmp_path_factory.mktemp("models") / "tiny-sharp"
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sharp(tiny_path):
    """tiny-random with logits ×25 (final norm scaled): peaked, context-dependent distributions
    (greedy and sampling tests need them; the plain random model's are nearly flat)."""
    from rlhfkit.models.loading import load_causal_lm

    loaded = load_causal_lm(tiny_path)
    with torch.no_grad():
        loaded.model.model.norm.weight.mul_(25.0)
    return loaded
