"""tunelab.accel.ckernels: libraries built for an explicit instruction-set level, keyed on source, flags and
compiler version, build errors kept, old builds removed."""

import ctypes

import pytest

from tunelab.accel import ckernels

V2 = {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}
V3 = V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
V4 = V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
SOURCE = "int tunelab_answer(void) { return 42; }\n"

needs_cc = pytest.mark.skipif(ckernels.compiler() is None, reason="needs a C compiler (gcc is on CI)")


@pytest.mark.parametrize(("flags", "level"), [
    (V4 | {"amx_tile"}, "x86-64-v4"), (V3 | {"avx512f"}, "x86-64-v3"),  # AVX-512F alone is not v4
    (V3 - {"fma"}, "x86-64-v2"), (V2, "x86-64-v2"), ({"sse2"}, "x86-64")])
def test_level_from_cpu_flags(flags, level, monkeypatch):
    monkeypatch.setattr(ckernels.platform, "machine", lambda: "x86_64")
    assert ckernels.isa_level(set(flags)) == level


def test_flags_name_a_level_not_this_machine(monkeypatch):
    monkeypatch.setattr(ckernels, "isa_level", lambda: "x86-64-v3")
    flags = ckernels.build_flags()
    assert "-march=x86-64-v3" in flags and "-march=native" not in flags and "-mtune=native" in flags


def _answer(lib) -> int:
    lib.tunelab_answer.restype = ctypes.c_int
    return lib.tunelab_answer()


@needs_cc
def test_cache_is_keyed_on_level_and_compiler_and_keeps_one_build(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cc, version = ckernels.compiler()
    level = ckernels.isa_level() or ckernels.platform.machine()
    (tmp_path / "tunelab" / "kernels").mkdir(parents=True)
    legacy = tmp_path / "tunelab" / "kernels" / "probe-0123456789abcdef.so"  # a -march=native build of old
    legacy.write_bytes(b"")
    assert _answer(ckernels.load("probe", SOURCE, {})) == 42
    first = sorted(p.name for p in (tmp_path / "tunelab" / "kernels").iterdir())
    assert len(first) == 1 and first[0].startswith(f"probe-{level}-") and not legacy.exists()
    monkeypatch.setattr(ckernels, "compiler", lambda: (cc, version + " (another build)"))
    assert _answer(ckernels.load("probe", SOURCE, {})) == 42
    second = sorted(p.name for p in (tmp_path / "tunelab" / "kernels").iterdir())
    assert len(second) == 1 and second != first  # rebuilt for the other compiler; the old build removed
    assert "probe" not in ckernels.problems


@needs_cc
def test_a_failed_build_is_kept_as_a_reason_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ckernels.load("broken", "int f(void) { return }\n", {}) is None
    assert "failed" in ckernels.problems["broken"] and "error" in ckernels.problems["broken"]
    assert not list((tmp_path / "tunelab" / "kernels").glob("*.so"))
    monkeypatch.setenv("TUNELAB_C_KERNELS", "0")  # read by tunelab.accel.kernels.choose only (test_speedups.py)
    assert _answer(ckernels.load("probe", SOURCE, {})) == 42 and "probe" not in ckernels.problems


def test_doctor_prints_every_speed_up_and_why_one_is_off(capsys, monkeypatch):
    from tunelab.accel import fused
    from tunelab.cli import main

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("chunked head + loss", "last-layer shortcut", "fused RMSNorm", "fused SwiGLU", "fused rotary",
                 "fused LoRA autograd", "4-bit dequantize"):
        assert f"  {name}" in out, name
    assert "versions: tunelab" in out and "C kernels built for" in out
    monkeypatch.setattr(fused, "available", lambda: False)  # as without a compiler
    assert main(["doctor", "--family", "qwen2"]) == 0
    out = capsys.readouterr().out
    assert "speed-ups for qwen2 on cpu" in out and "off  fused RMSNorm: no C compiler" in out
