"""designmodel.compile: specs outside the zoo, the kernel cache, and what cannot compile."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings

import designmodel
from designmodel.codegen import emit
from designmodel.codegen.plan import PlanError
from designmodel.derive import derive
from designmodel.reference import recurrent
from designmodel.sampling import random_initial, random_inputs
from designmodel.spec import (Constant, DesignModel, Input, Readout, Regression, Transition, Write,
                              exp, reset, sigmoid, softplus)

from .helpers import relative_error
from tests.strategies import specs

a = Input("a")
ak = Input("ak", per="key")
dt = Input("dt", domain="positive")
c = Input("c", domain="positive")
r = Input("r", domain="positive")
lam = Constant("lam", per="key", domain="unit")

SPECS = {
    # reset with the full gain c / (c |k|^2 + r) (keys not unit), sigmoid decay, prior readout
    "reset_sigmoid_prior": DesignModel("reset_sigmoid_prior", transition=Transition(decay=sigmoid(a)),
                                       observation=Regression(noise=r), filter=reset(c),
                                       readout=Readout(timing="prior")),
    # per-key decay mixing a per-key and a per-head input, prior readout
    "write_softplus_per_key": DesignModel("write_softplus_per_key",
                                          transition=Transition(decay=exp(-softplus(ak) * dt)),
                                          observation=Write(), readout=Readout(timing="prior")),
    # reset with a per-key decay and the full gain
    "reset_per_key": DesignModel("reset_per_key", transition=Transition(decay=exp(-softplus(ak))),
                                 observation=Regression(noise=r), filter=reset(c)),
    # a per-key constant decay
    "write_constant_per_key": DesignModel("write_constant_per_key", transition=Transition(decay=lam),
                                          observation=Write()),
}


def check_op(op, B, T, H, K, V, seed=0, path="two_pass", cu_seqlens=None):
    d = op.derivation
    q, k, v, ins = random_inputs(d, B, T, H, K, V, seed=seed)
    S0, _ = random_initial(B if cu_seqlens is None else len(cu_seqlens) - 1, H, K, V, seed=seed)
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32)
    o, state = op(q.float(), k.float(), v.float(), **{n: ins[n].float() for n in op.inputs},
                  scale=1.0, initial_state=S0.float(), output_final_state=True, cu_seqlens=cu,
                  config={"path": path})
    ref = recurrent(d, q, k, v, ins, initial_state=S0, cu_seqlens=None if cu is None else cu.long())
    return relative_error(o, ref.o), relative_error(state, ref.state)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kernel-cache")


@pytest.mark.parametrize("path", ["two_pass", "fused"])
@pytest.mark.parametrize("name", list(SPECS))
def test_spec_outside_the_zoo_matches_float64_filter(name, path, cache):
    op = designmodel.compile(SPECS[name], cache=cache)
    assert op.source != "zoo" and Path(op.source).parent == cache
    err_o, err_s = check_op(op, 2, 90, 2, 32, 16, path=path)
    assert err_o <= 1e-5 and err_s <= 1e-5, (err_o, err_s)


def test_spec_outside_the_zoo_with_packed_sequences(cache):
    op = designmodel.compile(SPECS["reset_sigmoid_prior"], cache=cache)
    err_o, err_s = check_op(op, 1, 130, 2, 16, 32, cu_seqlens=[0, 50, 51, 130])
    assert err_o <= 1e-5 and err_s <= 1e-5, (err_o, err_s)


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(spec=specs())
def test_random_specs_of_the_write_and_reset_families(spec, tmp_path_factory):
    d = derive(spec)
    assume(d.structure.family in ("write", "reset") and not d.structure.variance)
    op = designmodel.compile(spec, cache=tmp_path_factory.getbasetemp() / "random-specs")
    K = spec.key_dim or 16
    err_o, err_s = check_op(op, 1, 70, 2, K, 16, seed=1)
    assert err_o <= 1e-5 and err_s <= 1e-5, (d.one_line(), err_o, err_s)


def test_zoo_spec_uses_the_committed_kernels():
    op = designmodel.compile("gated_deltanet")
    assert op.source == "zoo"
    assert list(op.inputs) == ["beta", "g"]
    assert "gated_deltanet" in repr(op)


def test_inputs_are_named_after_the_spec(cache):
    op = designmodel.compile(SPECS["write_softplus_per_key"], cache=cache)
    assert op.inputs == {"ak": ("[B, T, H, K]", "real"), "dt": ("[B, T, H]", "positive")}
    q = torch.randn(1, 10, 1, 16)
    with pytest.raises(ValueError, match="missing input"):
        op(q, q, q, ak=torch.zeros(1, 10, 1, 16))
    with pytest.raises(ValueError, match="unknown argument"):
        op(q, q, q, ak=torch.zeros(1, 10, 1, 16), dt=torch.ones(1, 10, 1), g=1)
    with pytest.raises(ValueError, match="dt must be > 0"):
        op(q, q, q, ak=torch.zeros(1, 10, 1, 16), dt=torch.zeros(1, 10, 1))


def test_kalman_and_variance_are_refused_with_a_reason():
    spec = DesignModel("with_variance", transition=Transition(decay=exp(Input("g", domain="logdecay"))),
                       observation=Write(), readout=Readout(variance=True))
    with pytest.raises(PlanError, match="variance"):
        designmodel.compile(spec)


def test_reserved_input_name_is_refused():
    k0 = Input("k0", domain="logdecay")
    spec = DesignModel("reserved", transition=Transition(decay=exp(k0)), observation=Write())
    with pytest.raises(PlanError, match="reserved"):
        designmodel.compile(spec)


# --- the cache ----------------------------------------------------------------------------

def test_cache_key_depends_on_the_spec_and_compiler_version(cache):
    a1 = emit.spec_hash(SPECS["reset_per_key"])
    assert a1 == emit.spec_hash(SPECS["reset_per_key"])
    assert a1 != emit.spec_hash(SPECS["reset_sigmoid_prior"])
    # the same expression over inputs of another domain is another spec
    g2 = Input("a", domain="logdecay")
    other = DesignModel("reset_sigmoid_prior", transition=Transition(decay=exp(g2)),
                        observation=Regression(noise=r), filter=reset(c), readout=Readout(timing="prior"))
    assert emit.spec_hash(other) != emit.spec_hash(SPECS["reset_sigmoid_prior"])
    assert emit.COMPILER_VERSION.startswith(designmodel.__version__ + "+")


def test_cache_entry_is_reused(cache):
    d = derive(SPECS["write_constant_per_key"])
    folder = emit.build(d, cache)
    stamp = (folder / "kernels.py").stat().st_mtime_ns
    assert emit.build(d, cache) == folder
    assert (folder / "kernels.py").stat().st_mtime_ns == stamp
    assert emit.cache_entry_ok(folder)
    assert (folder / "derivation.md").read_text() == d.to_markdown()


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    d = derive(SPECS["write_constant_per_key"])
    folder = emit.build(d, tmp_path)
    good = (folder / "kernels.py").read_text()
    (folder / "kernels.py").write_text(good[: len(good) // 2])   # truncated
    assert not emit.cache_entry_ok(folder)
    assert emit.build(d, tmp_path) == folder
    assert (folder / "kernels.py").read_text() == good
    (folder / "kernels.py.sha256").unlink()                     # stamp lost
    assert not emit.cache_entry_ok(folder)
    emit.build(d, tmp_path)
    assert emit.cache_entry_ok(folder)


def test_two_processes_compile_one_spec_at_once(tmp_path):
    script = (
        "import sys\n"
        "from designmodel.codegen import emit\n"
        "from designmodel.derive import derive\n"
        "from designmodel.spec import Constant, DesignModel, Transition, Write\n"
        "lam = Constant('lam', per='key', domain='unit')\n"
        "spec = DesignModel('racing', transition=Transition(decay=lam), observation=Write())\n"
        "for _ in range(5):\n"
        "    folder = emit.build(derive(spec), sys.argv[1])\n"
        "assert emit.cache_entry_ok(folder)\n"
        "print(folder)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(emit.ROOT)) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert outs[0][0] == outs[1][0]
    folder = Path(outs[0][0].strip())
    assert emit.cache_entry_ok(folder)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
