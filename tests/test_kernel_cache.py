"""Kernels compiled into an image (a read-only $NUMBA_CACHE_DIR under a read-only root filesystem) are used, not
compiled anew: nexlify.env.fused_portfolio.seed_cache_dir copies them once into the user's writable cache."""

from __future__ import annotations

from pathlib import Path

from nexlify.env.fused_portfolio import _writable, seed_cache_dir, user_cache_dir


def _kernels(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "kernel.nbi").write_bytes(b"index")
    (folder / "sub" / "kernel.nbc").write_bytes(b"code")
    return folder


def test_read_only_image_cache_is_copied_into_the_user_cache(tmp_path):
    image, user = _kernels(tmp_path / "image"), tmp_path / "home" / "numba"
    read_only = {str(image)}
    got = seed_cache_dir(str(image), user, writable=lambda f: str(f) not in read_only)
    assert got == str(user)
    assert (user / "sub" / "kernel.nbi").read_bytes() == b"index"
    assert (user / "sub" / "kernel.nbc").read_bytes() == b"code"


def test_files_already_in_the_user_cache_are_kept(tmp_path):
    """An index the user's cache holds (kernels compiled there since) is not overwritten by the image's."""
    image, user = _kernels(tmp_path / "image"), tmp_path / "home" / "numba"
    (user / "sub").mkdir(parents=True)
    (user / "sub" / "kernel.nbi").write_bytes(b"index with more signatures")
    assert seed_cache_dir(str(image), user, writable=lambda f: str(f) != str(image)) == str(user)
    assert (user / "sub" / "kernel.nbi").read_bytes() == b"index with more signatures"
    assert (user / "sub" / "kernel.nbc").read_bytes() == b"code"


def test_writable_missing_or_unset_cache_is_left_alone(tmp_path):
    image, user = _kernels(tmp_path / "image"), tmp_path / "home" / "numba"
    assert seed_cache_dir(str(image), user, writable=lambda f: True) is None  # numba writes there itself
    assert seed_cache_dir(str(tmp_path / "absent"), user, writable=lambda f: False) is None
    assert seed_cache_dir(None, user, writable=lambda f: False) is None
    assert not user.exists()


def test_no_writable_copy_keeps_numba_on_its_own_fallbacks(tmp_path):
    image = _kernels(tmp_path / "image")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert seed_cache_dir(str(image), blocker / "numba", writable=lambda f: False) is None  # copytree fails


def test_writable_is_numbas_own_test(tmp_path):
    assert _writable(tmp_path)
    assert not _writable(tmp_path / "absent")


def test_user_cache_dir_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache_dir() == tmp_path / "numba"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_cache_dir() == Path.home() / ".cache" / "numba"


def test_compiled_points_numba_at_the_copy_before_it_builds_the_kernel(tmp_path, monkeypatch):
    """compiled() seeds the cache before numba's dispatcher picks its cache folder (numba.njit is lazy: nothing
    is compiled here)."""
    import numba

    import nexlify.env.fused_portfolio as fp

    image, cache_home = _kernels(tmp_path / "image"), tmp_path / "xdg"
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(image))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    monkeypatch.setattr(fp, "_compiled", {})
    monkeypatch.setattr(fp, "_writable", lambda f, real=fp._writable: str(f) != str(image) and real(f))
    monkeypatch.setattr(fp.seed_cache_dir, "__defaults__", (fp._writable,))
    dispatcher = fp.compiled(fp._kernel, "_portfolio_kernel", False)
    assert numba.config.CACHE_DIR == str(cache_home / "numba")
    assert (cache_home / "numba" / "sub" / "kernel.nbc").read_bytes() == b"code"
    assert str(dispatcher._cache._cache_path).startswith(str(cache_home / "numba"))
