"""The cache folder's rules, one at a time, with real files under tmp_path (we run as root in
CI's container and here, so a file of another user is made with chown): which entries count
as a cached recording or an index, what a refusal says (the path and the fix), what the lock
file tells about its holder, the clean-stop marker, descriptors given back, the folders
above the root, and the books of DiskCache (evicted bytes, pins after a commit, size_of)."""

from __future__ import annotations

import errno
import fcntl
import grp
import logging
import os
import pwd
import re
import resource
import shutil
import signal
import stat
import tempfile
import time
import types

import pytest

from yeastarfs import cache as cache_module
from yeastarfs import errors
from yeastarfs.cache import CacheDir, DiskCache

from harness import readable  # noqa: E402
from test_cache import A, B, C, Y, content, fake_disk, fill, read_fd, store  # noqa: E402

NOBODY = 65534


def own_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def ran_before(pbx) -> None:
    """Make the per-PBX folder look like one a daemon ran in (it has an index)."""
    (pbx / "index.sqlite3").write_bytes(b"")


def hold_lock(path, text: bytes) -> int:
    """Another daemon holding the lock file at *path*, which says *text*."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, text)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def read_cached(cache: DiskCache, name: str) -> bytes:
    """The whole of cached *name*, opened as a reader opens it and released after."""
    fd = cache.open_complete(name)
    try:
        return read_fd(fd)
    finally:
        os.close(fd)
        cache.release(name)


# -- what exists, and what counts ------------------------------------------------------------


def test_an_index_that_is_a_dangling_symlink_still_counts_as_a_folder_that_ran(tmp_path):
    # The name is there (whatever it is): the folder is a PBX's, and a daemon ran in it.
    root = tmp_path / "cache"
    pbx = root / "pbx"
    pbx.mkdir(parents=True, mode=0o700)
    (pbx / "index.sqlite3").symlink_to(tmp_path / "nowhere")
    assert CacheDir.names(str(root)) == ["pbx"]
    with CacheDir(str(root), "pbx") as folder:
        assert not folder.clean_start                   # ran, and left no clean-stop marker


def test_a_symlink_to_a_pbx_folder_is_not_another_pbx(tmp_path):
    root = tmp_path / "cache"
    CacheDir(str(root), "pbx-a", lock=False).close()
    ran_before(root / "pbx-a")
    (root / "alias").symlink_to(root / "pbx-a")
    assert CacheDir.names(str(root)) == ["pbx-a"]


def test_a_clean_stop_marker_that_is_a_symlink_is_no_marker_and_is_removed(tmp_path):
    root = tmp_path / "cache"
    pbx = root / "pbx"
    pbx.mkdir(parents=True, mode=0o700)
    ran_before(pbx)
    target = tmp_path / "ours"
    target.write_bytes(b"")
    (pbx / "clean-stop").symlink_to(target)
    with CacheDir(str(root), "pbx") as folder:
        assert not folder.clean_start                   # the sizes will be checked
    assert not os.path.lexists(pbx / "clean-stop") and target.exists()
    (pbx / "clean-stop").symlink_to(tmp_path / "nowhere")  # dangling: removed as well
    with CacheDir(str(root), "pbx") as folder:
        assert not folder.clean_start
    assert not os.path.lexists(pbx / "clean-stop")


def test_a_pinned_name_never_reports_the_size_of_what_a_planted_link_points_to(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=100_000)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 5000)
    partial = cache.new_partial(A)                      # a download in progress pins A
    os.symlink(big, os.path.join(cache.root, "complete", A))
    assert cache.size_of(A) != 5000
    partial.discard()
    partial.close()


def test_size_of_never_leaves_the_complete_folder(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=100_000)
    store(cache, A, 100)
    for name in ("..", ".", "", "../partial", "a\0b"):
        assert cache.size_of(name) is None, name
    # A file the cache did not put there is not one of its recordings.
    (tmp_path / "cache" / "complete" / B).write_bytes(b"y" * 70)
    assert cache.size_of(B) is None and cache.size_of(A) == 100


# -- refusals: the path and the fix ----------------------------------------------------------


def test_a_planted_log_symlink_is_refused_naming_the_log_file_and_the_fix(tmp_path):
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    (root / "yeastarfs.log").symlink_to(tmp_path / "elsewhere")
    shown = str(root / "yeastarfs.log")
    with pytest.raises(errors.ConfigError) as caught:
        cache_module.daemon_log_path(str(root))
    assert f"{shown} is a symlink" in str(caught.value)
    assert f"rm {shown}" in str(caught.value)
    assert not (tmp_path / "elsewhere").exists()


def test_a_lock_that_is_a_symlink_is_refused_naming_its_path_and_the_fix(tmp_path):
    pbx = tmp_path / "cache" / "pbx"
    pbx.mkdir(parents=True, mode=0o700)
    (pbx / "lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(errors.ConfigError) as caught:
        CacheDir(str(tmp_path / "cache"), "pbx")
    assert f"{pbx / 'lock'} is a symlink" in str(caught.value)
    assert f"rm {pbx / 'lock'}" in str(caught.value)


def test_a_lock_that_cannot_be_opened_names_the_file_and_the_reason(tmp_path):
    pbx = tmp_path / "cache" / "pbx"
    (pbx / "lock").mkdir(parents=True, mode=0o700)      # a folder where the lock file goes
    with pytest.raises(errors.ConfigError) as caught:
        CacheDir(str(tmp_path / "cache"), "pbx")
    assert str(pbx / "lock") in str(caught.value)
    assert os.strerror(errno.EISDIR) in str(caught.value)


@pytest.mark.parametrize("kind", ["foreign regular file", "own fifo", "second hard link"])
def test_a_lock_that_is_not_our_only_regular_file_is_refused(tmp_path, kind):
    pbx = tmp_path / "cache" / "pbx"
    pbx.mkdir(parents=True, mode=0o700)
    lock = pbx / "lock"
    if kind == "foreign regular file":
        lock.write_bytes(b"")
        os.chown(lock, NOBODY, NOBODY)
    elif kind == "own fifo":
        os.mkfifo(lock, 0o600)
    else:
        (tmp_path / "other").write_bytes(b"")
        os.link(tmp_path / "other", lock)
    with pytest.raises(errors.ConfigError) as caught:
        CacheDir(str(tmp_path / "cache"), "pbx")
    message = str(caught.value)
    assert re.search(f"{re.escape(str(lock))} is not a regular file of this user", message), message
    assert f"rm {lock}" in message


def test_a_foreign_pbx_folder_is_refused_by_its_own_path(tmp_path):
    root = tmp_path / "cache"
    (root / "pbx").mkdir(parents=True, mode=0o700)
    os.chmod(root, 0o700)
    os.chown(root / "pbx", NOBODY, NOBODY)
    with pytest.raises(errors.ConfigError) as caught:
        CacheDir(str(root), "pbx")
    message = str(caught.value)
    assert f"{root / 'pbx'} belongs to uid {NOBODY}, not to this user (uid {os.geteuid()})" in message
    assert "; remove it or use another --cache-dir (its owner could plant links in it)" in message


def test_a_folder_that_must_exist_is_never_created(tmp_path):
    root = tmp_path / "cache"
    with pytest.raises(errors.ConfigError, match="does not exist"):
        CacheDir(str(root), "pbx", lock=False, create=False)
    assert not root.exists()
    root.mkdir(mode=0o700)
    with pytest.raises(errors.ConfigError, match=f"{re.escape(str(root / 'pbx'))} does not exist"):
        CacheDir(str(root), "pbx", lock=False, create=False)
    assert os.listdir(root) == []


# -- the folders above the root: groups ------------------------------------------------------


def _unused_gid() -> int:
    for gid in range(54321, 54421):
        try:
            grp.getgrgid(gid)
        except KeyError:
            return gid
    raise AssertionError("no unused gid")


@pytest.mark.parametrize("group", ["unknown group", "a group of no one"])
def test_a_folder_above_writable_by_a_group_not_this_users_own_is_refused(tmp_path, group):
    if group == "unknown group":
        gid = _unused_gid()
    else:
        # A real group that is not root's primary one and lists no member (nogroup).
        gid = grp.getgrnam("nogroup").gr_gid
        assert gid != pwd.getpwuid(os.geteuid()).pw_gid and grp.getgrgid(gid).gr_mem == []
    above = tmp_path / "above"
    above.mkdir()
    os.chown(above, os.geteuid(), gid)
    os.chmod(above, 0o775)
    with pytest.raises(errors.ConfigError, match="which other users may write to"):
        CacheDir(str(above / "cache"), "pbx")
    assert os.listdir(above) == []


@pytest.mark.parametrize("members, accepted", [(["root"], True), ([], True), (["root", "mallory"], False)])
def test_this_users_primary_group_is_its_own_only_while_no_one_else_is_in_it(tmp_path, monkeypatch,
                                                                             members, accepted):
    # Adding a member to root's group would change the machine: the group database is the
    # one thing faked here (the folders are real).
    user = pwd.getpwuid(os.geteuid())
    real_getgrgid = grp.getgrgid

    def getgrgid(gid):
        if gid == user.pw_gid:
            return types.SimpleNamespace(gr_mem=list(members))
        return real_getgrgid(gid)

    monkeypatch.setattr(cache_module.grp, "getgrgid", getgrgid)
    above = tmp_path / "above"
    above.mkdir()
    os.chown(above, os.geteuid(), user.pw_gid)
    os.chmod(above, 0o775)
    if accepted:
        CacheDir(str(above / "cache"), "pbx").close()
    else:
        with pytest.raises(errors.ConfigError, match="which other users may write to"):
            CacheDir(str(above / "cache"), "pbx")


# -- the lock file and its holder ------------------------------------------------------------


def test_the_holder_named_in_the_refusal_is_the_lock_files_first_32_bytes(tmp_path):
    pbx = tmp_path / "cache" / "pbx"
    pbx.mkdir(parents=True, mode=0o700)
    fd = hold_lock(pbx / "lock", b"1234567890" * 4 + b"\n")
    try:
        with pytest.raises(errors.ConfigError) as caught:
            CacheDir(str(tmp_path / "cache"), "pbx")
        assert f"(pid {'1234567890' * 3 + '12'})" in str(caught.value)
        with CacheDir(str(tmp_path / "cache"), "pbx", lock=False) as looking:
            assert looking.holder_pid() == "1234567890" * 3 + "12"
    finally:
        os.close(fd)


def test_a_holder_that_wrote_garbage_or_nothing_is_still_reported(tmp_path):
    pbx = tmp_path / "cache" / "pbx"
    pbx.mkdir(parents=True, mode=0o700)
    fd = hold_lock(pbx / "lock", b"\xff42\n")
    try:
        with pytest.raises(errors.ConfigError, match="\\(pid \ufffd42\\)"):
            CacheDir(str(tmp_path / "cache"), "pbx")
        with CacheDir(str(tmp_path / "cache"), "pbx", lock=False) as looking:
            assert looking.holder_pid() == "\ufffd42"
        os.ftruncate(fd, 0)
        with pytest.raises(errors.ConfigError, match="in use by a running yeastarfs \\(pid \\?\\)"):
            CacheDir(str(tmp_path / "cache"), "pbx")
        with CacheDir(str(tmp_path / "cache"), "pbx", lock=False) as looking:
            assert looking.holder_pid() == "?"
    finally:
        os.close(fd)


def test_no_lock_file_means_an_unknown_holder(tmp_path):
    with CacheDir(str(tmp_path / "cache"), "pbx", lock=False) as looking:
        assert looking.holder_pid() == "?"


# -- the clean-stop marker, closing ----------------------------------------------------------


def test_leaving_a_with_block_is_no_clean_stop(tmp_path):
    pbx = tmp_path / "cache" / "pbx"
    with CacheDir(str(tmp_path / "cache"), "pbx"):
        pass
    assert not (pbx / "clean-stop").exists()


def test_a_start_that_fails_after_taking_the_lock_writes_no_clean_stop_marker(tmp_path, caplog):
    pbx = tmp_path / "cache" / "pbx"
    pbx.mkdir(parents=True, mode=0o700)
    (pbx / "clean-stop").mkdir()                        # cannot be taken (unlinked) as a marker
    caplog.set_level(logging.WARNING, logger="yeastarfs.cache")
    with pytest.raises(OSError):
        CacheDir(str(tmp_path / "cache"), "pbx")
    assert not any("clean-stop" in record.getMessage() for record in caplog.records), caplog.text
    assert (pbx / "clean-stop").is_dir()
    fd = os.open(pbx / "lock", os.O_RDWR)              # and the lock was given back
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_a_marker_that_cannot_be_written_is_reported_by_its_path(tmp_path, caplog):
    pbx = tmp_path / "cache" / "pbx"
    folder = CacheDir(str(tmp_path / "cache"), "pbx")
    (pbx / "clean-stop").symlink_to(tmp_path / "elsewhere")
    caplog.set_level(logging.WARNING, logger="yeastarfs.cache")
    folder.close()
    assert f"{pbx / 'clean-stop'} is a symlink" in caplog.text
    assert not (tmp_path / "elsewhere").exists()


def test_close_gives_back_every_descriptor_and_twice_is_harmless(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                         # nothing may land in the working folder
    CacheDir(str(tmp_path / "cache"), "pbx").close()    # the folders exist: count from here
    before = own_fds()
    folder = CacheDir(str(tmp_path / "cache"), "pbx")
    folder.close()
    assert own_fds() == before
    folder.close()
    folder.close(clean_stop=True)
    assert own_fds() == before
    assert sorted(os.listdir(tmp_path)) == ["cache"]
    assert (tmp_path / "cache" / "pbx" / "clean-stop").exists()


# -- the cache commands ----------------------------------------------------------------------


def test_a_folder_without_complete_recordings(tmp_path):
    with CacheDir(str(tmp_path / "cache"), "pbx") as folder:
        assert folder.complete_files() == []
        assert folder.problem_with("20261127093012-1.1-1-2-Inbound.wav", None) == "not cached"
        assert folder.remove_complete() == (0, 0)
        with CacheDir(str(tmp_path / "cache"), "pbx", lock=False) as looking:
            with pytest.raises(RuntimeError, match="^remove_complete needs the folder's lock"):
                looking.remove_complete()


def test_a_file_vanishing_while_the_folder_is_listed_is_skipped(tmp_path, monkeypatch):
    complete = tmp_path / "cache" / "pbx" / "complete"
    complete.mkdir(parents=True, mode=0o700)
    for name, size in (("a.wav", 10), ("b.wav", 20), ("c.wav", 30)):
        (complete / name).write_bytes(b"x" * size)
    order = os.listdir(complete)                        # the order scandir yields them in
    real = cache_module._is_own_file
    calls = []

    def vanish_second(st):
        if not calls:
            os.unlink(complete / order[1])              # gone before its turn (cache clear, eviction)
        calls.append(st)
        return real(st)

    monkeypatch.setattr(cache_module, "_is_own_file", vanish_second)
    with CacheDir(str(tmp_path / "cache"), "pbx", lock=False) as folder:
        sizes = {"a.wav": 10, "b.wav": 20, "c.wav": 30}
        assert folder.complete_files() == sorted((name, sizes[name]) for name in (order[0], order[2]))


# -- DiskCache's books -----------------------------------------------------------------------


def test_evicted_bytes_add_up(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    store(cache, A, 400)
    store(cache, B, 300)
    store(cache, C, 900)                                # A and B go
    assert cache.stats.evictions == 2 and cache.stats.evicted_bytes == 700


def test_the_free_space_floor_is_met_when_exactly_reached(tmp_path, monkeypatch):
    root = str(tmp_path / "cache")
    fake_disk(monkeypatch, root, capacity=2000, other_used=1000)
    cache = DiskCache(root, max_bytes=100_000, min_free_bytes=1000)
    assert cache.free_space_ok()                        # 1000 free, 1000 asked
    fake_disk(monkeypatch, root, capacity=2000, other_used=1001)
    assert not cache.free_space_ok()


def test_a_discard_after_the_commit_keeps_the_file_and_its_pin(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    partial = fill(cache, A, 300)
    partial.commit()
    partial.discard()                                   # too late: the recording is whole
    assert cache.usage()["pinned_bytes"] == 300
    partial.sync()
    partial.close()
    assert read_cached(cache, A) == content(A, 300)
    assert cache.usage()["idle_bytes"] == 300


# -- the folders above the root: owners, symlinks, every level -------------------------------


def _nobodys_symlink(link, target) -> None:
    link.symlink_to(target)
    os.lchown(link, NOBODY, NOBODY)


@pytest.mark.parametrize("where", ["right above the root", "further up"])
def test_a_symlink_of_another_user_on_the_way_is_refused_naming_it(tmp_path, where):
    real = tmp_path / "real"
    (real / "deeper").mkdir(parents=True)
    link = tmp_path / "link"
    _nobodys_symlink(link, real)
    root = link / "cache" if where == "right above the root" else link / "deeper" / "cache"
    with pytest.raises(errors.ConfigError) as caught:
        CacheDir(str(root), "pbx")
    message = str(caught.value)
    assert f"cache folder {root} is reached through {link}, a symlink of uid {NOBODY}; use another --cache-dir" \
        in message
    assert os.listdir(real) == ["deeper"] and os.listdir(real / "deeper") == []


def test_a_symlink_of_root_on_the_way_is_followed(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    CacheDir(str(tmp_path / "link" / "cache"), "pbx").close()
    assert os.listdir(real) == ["cache"]


def test_a_folder_above_of_another_user_is_refused_naming_it(tmp_path):
    above = tmp_path / "above"
    above.mkdir(mode=0o755)
    os.chown(above, NOBODY, NOBODY)
    with pytest.raises(errors.ConfigError) as caught:
        CacheDir(str(above / "cache"), "pbx")
    message = str(caught.value)
    assert f"cache folder {above / 'cache'} lies in {above}, which belongs to uid {NOBODY}; use another --cache-dir" \
        in message
    assert os.listdir(above) == []


def test_every_level_above_is_checked_even_the_missing_ones(tmp_path):
    above = tmp_path / "above"
    (above / "sub").mkdir(parents=True)
    os.chmod(above / "sub", 0o755)
    os.chmod(above, 0o777)                              # two levels up, and not sticky
    for root in (above / "sub" / "cache", above / "missing" / "cache"):
        with pytest.raises(errors.ConfigError) as caught:
            CacheDir(str(root), "pbx")
        message = str(caught.value)
        assert f"cache folder {root} lies in {above}, which other users may write to" in message
        assert f"chmod go-w {above}" in message
    assert sorted(os.listdir(above)) == ["sub"] and os.listdir(above / "sub") == []


def test_missing_folders_above_the_root_are_created(tmp_path):
    CacheDir(str(tmp_path / "a" / "b" / "cache"), "pbx").close()
    assert (tmp_path / "a" / "b" / "cache" / "pbx").is_dir()


def test_a_folder_above_writable_only_by_its_owner_may_have_any_group(tmp_path):
    above = tmp_path / "above"
    above.mkdir()
    os.chown(above, os.geteuid(), grp.getgrnam("nogroup").gr_gid)
    os.chmod(above, 0o755)
    CacheDir(str(above / "cache"), "pbx").close()


def test_a_user_other_than_root_keeps_its_cache_in_its_own_folders(tmp_path):
    # The daemon may run as an ordinary user: its own folders and root's are trusted.
    home = tempfile.mkdtemp(prefix="yeastarfs-nobody-", dir="/tmp")   # /tmp: root's, sticky
    try:
        os.chown(home, NOBODY, NOBODY)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:                                    # the child: nobody, then the check
            status = b"?"
            try:
                os.close(read)
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                CacheDir(os.path.join(home, "cache"), "pbx").close()
                status = b"ok"
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                status = repr(exc).encode()[:500]
            finally:
                os.write(write, status)
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            ready = readable([pipe], 10.0)
            status = pipe.read() if ready else b"no answer within 10 s"
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert status == b"ok"
        assert os.stat(os.path.join(home, "cache", "pbx")).st_uid == NOBODY
    finally:
        shutil.rmtree(home)


# -- the root and the per-PBX folder themselves ----------------------------------------------


@pytest.mark.parametrize("which", ["root", "pbx"])
def test_a_folder_others_may_write_to_is_refused_naming_the_chmod(tmp_path, which):
    root = tmp_path / "cache"
    (root / "pbx").mkdir(parents=True)
    os.chmod(root, 0o700)
    os.chmod(root / "pbx", 0o700)
    writable = root if which == "root" else root / "pbx"
    for mode in (0o770, 0o702):
        os.chmod(writable, mode)
        with pytest.raises(errors.ConfigError) as caught:
            CacheDir(str(root), "pbx")
        message = str(caught.value)
        assert f"{writable} is writable by other users (mode {mode:03o}); run chmod 700 {writable}" in message
    assert not (root / "pbx" / "lock").exists()


def test_a_root_or_pbx_folder_that_is_a_symlink_is_refused_naming_it_and_the_fix(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(errors.ConfigError) as caught:
        CacheDir(str(tmp_path / "link"), "pbx")
    shown = str(tmp_path / "link")
    assert f"{shown} is a symlink or not a folder; remove it (rm {shown})" in str(caught.value)
    (real / "pbx").symlink_to(tmp_path)
    with pytest.raises(errors.ConfigError) as caught:
        CacheDir(str(real), "pbx")
    shown = str(real / "pbx")
    assert f"{shown} is a symlink or not a folder; remove it (rm {shown})" in str(caught.value)


def test_a_new_cache_root_is_private_whatever_the_umask(tmp_path):
    old_umask = os.umask(0)
    try:
        CacheDir(str(tmp_path / "cache"), "pbx").close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "cache" / "pbx").st_mode) == 0o700


def test_a_folder_that_cannot_be_made_or_opened_is_named_with_the_reason(tmp_path):
    name = "p" * 300                                    # longer than a file name may be
    shown = str(tmp_path / "cache" / name)
    with pytest.raises(errors.ConfigError) as caught:
        CacheDir(str(tmp_path / "cache"), name)
    assert f"{shown}: cannot create it: {os.strerror(errno.ENAMETOOLONG)}" in str(caught.value)
    with pytest.raises(errors.ConfigError) as caught:
        CacheDir(str(tmp_path / "cache"), name, create=False)
    assert f"{shown}: {os.strerror(errno.ENAMETOOLONG)}" in str(caught.value)


# -- names the cache refuses, names it takes ---------------------------------------------------


@pytest.mark.parametrize("name", ["", ".", "..", "x/y", "20261127101500-1.1-1-2-a\0b.wav"],
                         ids=["empty", "dot", "dotdot", "slash", "nul"])
def test_a_name_that_is_no_plain_file_name_is_never_cached(tmp_path, name):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    with pytest.raises(errors.CacheError) as caught:
        cache.new_partial(name)
    assert f"recording name {name!r} is not a plain file name" in str(caught.value)
    assert cache.open_complete(name) is None
    assert os.listdir(tmp_path / "cache" / "partial") == [] and cache.usage()["pinned"] == 0


def test_a_name_that_is_not_valid_utf8_is_cached_like_any_other(tmp_path):
    name = os.fsdecode(b"20261127101500-1.1-J\xfcrgen-1002-Internal.wav")   # a Latin-1 byte
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    store(cache, name, 100)
    assert os.listdir(tmp_path / "cache" / "partial") == []
    assert read_cached(cache, name) == content(name, 100)


def test_an_existing_root_keeps_its_mode_and_the_pbx_folder_is_made_0700(tmp_path):
    # A shared /var/cache/yeastarfs may be 0755; what is inside is the daemon's alone.
    root = tmp_path / "cache"
    (root / "pbx").mkdir(parents=True)
    os.chmod(root, 0o755)
    os.chmod(root / "pbx", 0o701)                       # no one else may write: accepted, tightened
    CacheDir(str(root), "pbx").close()
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(root / "pbx").st_mode) == 0o700


def test_missing_folders_above_the_root_are_created_private(tmp_path):
    old_umask = os.umask(0)
    try:
        CacheDir(str(tmp_path / "a" / "b" / "cache"), "pbx").close()
    finally:
        os.umask(old_umask)
    for path in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700, path


def test_a_folder_above_that_cannot_be_created_is_named_with_the_reason(tmp_path):
    parent = f"/proc/yeastarfs-test-{os.getpid()}"      # procfs refuses new folders
    with pytest.raises(errors.ConfigError) as caught:
        CacheDir(parent + "/cache", "pbx")
    assert f"cache folder {parent}: cannot create it: " in str(caught.value)


def test_a_root_under_a_file_is_refused_naming_both(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    root = tmp_path / "file" / "cache"
    with pytest.raises(errors.ConfigError) as caught:
        CacheDir(str(root), "pbx", lock=False, create=False)     # what `yeastarfs cache` opens
    assert f"cache folder {root}: {tmp_path / 'file'}: {os.strerror(errno.ENOTDIR)}" in str(caught.value)


# -- what a file says about its own length ---------------------------------------------------


def test_only_a_riff_wave_header_declares_a_length():
    size = (1000 - 8).to_bytes(4, "little")
    assert cache_module.riff_size(b"RIFF" + size + b"WAVE") == 1000
    assert cache_module.riff_size(b"RIFF" + size + b"AVI ") is None     # RIFF, but not a WAV file
    assert cache_module.riff_size(b"RIFX" + size + b"WAVE") is None     # big-endian RIFF: not ours
    assert cache_module.file_problem(600, b"RIFF" + size + b"AVI ", None) is None
    # More than the first 12 bytes (a whole 44-byte WAV header) says the same.
    assert cache_module.riff_size(b"RIFF" + size + b"WAVEfmt " + bytes(28)) == 1000
    # The field is unsigned: a WAV file may declare up to 4 GiB.
    assert cache_module.riff_size(b"RIFF" + b"\xf8\xff\xff\xff" + b"WAVE") == 4 << 30
    assert cache_module.riff_size(b"RIFF" + size + b"WAV") is None                 # cut short


def test_a_cache_without_a_free_space_floor_never_asks_the_disk(tmp_path, monkeypatch):
    def forbidden(path):
        raise AssertionError("disk_usage called without a free-space floor")

    monkeypatch.setattr(shutil, "disk_usage", forbidden)
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)    # no min_free_bytes given
    for name in (A, B, C):
        store(cache, name, 400)
    assert cache.free_space_ok() and cache.usage()["files"] == 2


@pytest.mark.parametrize("sub", ["complete", "partial"])
def test_a_subfolder_that_is_a_symlink_or_foreign_is_refused_naming_it(tmp_path, sub):
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    (tmp_path / "elsewhere").mkdir()
    (root / sub).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(errors.ConfigError) as caught:
        DiskCache(str(root), max_bytes=1000)
    assert f"{root / sub} is a symlink or not a folder" in str(caught.value)
    os.unlink(root / sub)
    (root / sub).mkdir(mode=0o700)
    os.chown(root / sub, NOBODY, NOBODY)
    with pytest.raises(errors.ConfigError) as caught:
        DiskCache(str(root), max_bytes=1000)
    assert f"{root / sub} belongs to uid {NOBODY}" in str(caught.value)
    assert os.listdir(tmp_path / "elsewhere") == []


def test_subfolders_others_may_write_to_are_tightened_not_refused(tmp_path):
    # Inside our own private root nobody else can reach them: made 0700 again.
    root = tmp_path / "cache"
    (root / "complete").mkdir(parents=True)
    (root / "partial").mkdir()
    os.chmod(root, 0o700)
    os.chmod(root / "complete", 0o777)
    os.chmod(root / "partial", 0o770)
    DiskCache(str(root), max_bytes=1000).close()
    for sub in ("complete", "partial"):
        assert stat.S_IMODE(os.stat(root / sub).st_mode) == 0o700, sub


# -- the budget while a download grows -------------------------------------------------------


def test_a_download_whose_pin_reaches_exactly_the_budget_evicts_the_idle_files(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    store(cache, A, 300)
    partial = fill(cache, B, 1000)                      # pins alone: exactly the budget
    assert cache.usage()["files"] == 0 and cache.stats.evicted_bytes == 300
    partial.discard()
    partial.close()


@pytest.mark.parametrize("expected, evicts", [(5000, False), (1001, False), (1000, True), (None, True)])
def test_only_a_download_announced_larger_than_the_budget_evicts_nothing(tmp_path, expected, evicts):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    store(cache, A, 300)
    store(cache, B, 300)
    partial = cache.new_partial(C)
    if expected is not None:
        partial.expect(expected)
    partial.write(content(C, 500))                      # 300 + 300 + 500: over the budget
    assert cache.contains(A) is not evicts and cache.contains(B)
    partial.discard()
    partial.close()


def _floor_cache(tmp_path, monkeypatch):
    """A cache of 1000 bytes with a floor of 1000 free bytes on a fake disk, holding A and
    B (300 each) and a download of C announced larger than the budget: the disk holds
    2600 bytes once C has 2000, and *capacity* decides what is free."""
    root = str(tmp_path / "cache")
    cache = DiskCache(root, max_bytes=1000, min_free_bytes=1000)
    fake_disk(monkeypatch, root, capacity=100_000)
    store(cache, A, 300)
    store(cache, B, 300)
    partial = cache.new_partial(C)
    partial.expect(5000)
    return root, cache, partial


def test_a_download_over_the_budget_evicts_only_for_the_free_space_floor(tmp_path, monkeypatch):
    root, cache, partial = _floor_cache(tmp_path, monkeypatch)
    fake_disk(monkeypatch, root, capacity=2600 + 1000)  # after 2000 bytes of C: exactly the floor free
    partial.write(content(C, 2000))
    assert cache.contains(A) and cache.contains(B)      # the floor holds: nothing goes
    partial.write(b"x")                                 # one byte below the floor: the oldest goes
    assert not cache.contains(A) and cache.contains(B)
    partial.discard()
    partial.close()


def test_a_download_over_the_budget_with_room_on_disk_evicts_nothing(tmp_path, monkeypatch):
    root, cache, partial = _floor_cache(tmp_path, monkeypatch)
    partial.write(content(C, 2000))
    assert cache.contains(A) and cache.contains(B) and cache.stats.evictions == 0
    partial.discard()
    partial.close()


# -- the mtime that orders the next start ----------------------------------------------------


def test_a_download_stored_again_is_the_most_recent_at_the_next_start(tmp_path):
    root = str(tmp_path / "cache")
    cache = DiskCache(root, max_bytes=1000)
    store(cache, A, 300)
    store(cache, B, 300)
    old = time.time() - 10_000
    os.utime(cache.complete_path(B), (old, old))
    os.utime(cache.complete_path(A), (old + 1, old + 1))
    partial = fill(cache, B, 300)                       # B downloaded again, slowly:
    os.utime(partial.path, (old - 1, old - 1))          # its partial file was last written long ago
    partial.commit()
    partial.sync()
    partial.close()
    assert os.stat(cache.complete_path(B)).st_mtime > time.time() - 60
    again = DiskCache(root, max_bytes=1000)
    store(again, C, 500)                                # the oldest goes: A, not B
    assert again.contains(B) and not again.contains(A)


def test_a_stray_file_found_at_start_is_removed_and_the_rest_still_loaded(tmp_path):
    complete = tmp_path / "cache" / "complete"
    complete.mkdir(parents=True, mode=0o700)
    names = [f"2026112709{i:02d}00-1.{i}-1-2-Internal.wav" for i in range(5)]
    for name in names:
        (complete / name).write_bytes(b"x" * 10)
    stray = os.listdir(complete)[0]                     # the first one the start-up sees
    os.chown(complete / stray, NOBODY, NOBODY)          # another user's: not a cached recording
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    assert sorted(os.listdir(complete)) == sorted(set(names) - {stray})
    assert all(cache.contains(name) for name in names if name != stray)
    assert cache.usage()["files"] == 4


# -- a name downloaded again, or read and downloaded at once ---------------------------------


def test_a_cached_name_downloaded_again_moves_from_the_lru_to_its_pin(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    store(cache, A, 300)
    again = cache.new_partial(A)
    assert cache.usage()["idle_bytes"] == 0 and cache.usage()["pinned_bytes"] == 300
    pressure = fill(cache, Y, 800)                      # 300 + 800 > 1000: only A could go
    assert cache.contains(A) and os.path.exists(cache.complete_path(A))
    for partial in (pressure, again):
        partial.discard()
        partial.close()
    assert cache.contains(A)


def test_a_failed_download_of_a_name_being_read_keeps_the_readers_pin(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    store(cache, A, 300)
    fd = cache.open_complete(A)                         # a reader
    failed = cache.new_partial(A)                       # and a download of the same name that fails
    failed.discard()
    failed.close()
    assert cache.usage()["pinned"] == 1 and cache.usage()["pinned_bytes"] == 300
    pressure = fill(cache, Y, 800)                      # A is still being read: never evicted
    assert os.pread(fd, 1000, 0) == content(A, 300)
    assert os.path.exists(cache.complete_path(A))
    pressure.discard()
    pressure.close()
    os.close(fd)
    cache.release(A)
    assert cache.contains(A) and cache.usage()["pinned"] == 0


def _next_partial_file(name: str) -> str:
    """The file name the next PartialFile of *name* will take (the ids count up per process)."""
    next_id = int(re.fullmatch(r"count\((\d+)\)", repr(cache_module._partial_ids)).group(1))
    return f"{cache_module._name_digest(name)}.{next_id}.part"


def test_a_partial_file_that_cannot_be_created_leaves_no_pin(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    store(cache, A, 300)
    (tmp_path / "cache" / "partial" / _next_partial_file(A)).mkdir()   # taken: O_EXCL fails
    with pytest.raises(errors.CacheError) as caught:
        cache.new_partial(A)
    assert f"recording {A}: cannot create a cache file: {os.strerror(errno.EEXIST)}" in str(caught.value)
    assert cache.usage() == {"idle_bytes": 300, "pinned_bytes": 0, "files": 1, "pinned": 0, "max_bytes": 1000}


# -- the mtime written on reads --------------------------------------------------------------


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


def test_reads_write_the_mtime_at_most_once_a_minute_even_just_after_boot(tmp_path, monkeypatch):
    root = str(tmp_path / "cache")
    store(DiskCache(root, max_bytes=1000), A, 300)
    clock = _Clock(10.0)                                # the monotonic clock starts at boot
    monkeypatch.setattr(cache_module, "time", clock)
    cache = DiskCache(root, max_bytes=1000)             # a restart: A never read in this run

    def read_at(now: float) -> float:
        clock.now = now
        os.utime(cache.complete_path(A), (1000.0, 1000.0))
        fd = cache.open_complete(A)
        os.close(fd)
        cache.release(A)
        return os.stat(cache.complete_path(A)).st_mtime

    assert read_at(10.0) != 1000.0                      # the first read writes it
    assert read_at(69.9) == 1000.0                      # not again within the minute
    assert read_at(70.0) != 1000.0                      # a minute later: again


def test_a_file_vanishing_while_the_start_lists_complete_is_skipped(tmp_path, monkeypatch):
    complete = tmp_path / "cache" / "complete"
    complete.mkdir(parents=True, mode=0o700)
    names = [f"2026112709{i:02d}00-1.{i}-1-2-Internal.wav" for i in range(3)]
    for name in names:
        (complete / name).write_bytes(b"x" * 10)
    order = os.listdir(complete)                        # the order scandir yields them in
    real = cache_module._is_own_file
    calls = []

    def vanish_second(st):
        if not calls:
            os.unlink(complete / order[1])              # gone before its turn
        calls.append(st)
        return real(st)

    monkeypatch.setattr(cache_module, "_is_own_file", vanish_second)
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    assert cache.contains(order[0]) and cache.contains(order[2]) and not cache.contains(order[1])


# -- a partial file's descriptors ------------------------------------------------------------


def _fds_on(path: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}") == path:
                found.append(int(entry))
        except OSError:
            continue
    return found


def _limit_to_one_free_descriptor():
    """Lower RLIMIT_NOFILE so that exactly one new descriptor can be opened; the old limits."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = {int(entry) for entry in os.listdir("/proc/self/fd")}
    free = []
    for fd in range(max(used) + 3):                     # the listing's own descriptor is closed now
        try:
            os.fstat(fd)
        except OSError:
            free.append(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (free[1], old[1]))   # below it: one free slot
    return old


def test_a_partial_file_that_cannot_be_opened_for_reading_is_removed_and_leaks_nothing(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    before = own_fds()
    old = _limit_to_one_free_descriptor()
    try:
        with pytest.raises(errors.CacheError) as caught:
            cache.new_partial(A)                        # the writer's open succeeds, the readers' fails
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)
    assert f"recording {A}: cannot create a cache file: {os.strerror(errno.EMFILE)}" in str(caught.value)
    assert os.listdir(tmp_path / "cache" / "partial") == []
    assert own_fds() == before and cache.usage()["pinned"] == 0


# -- reads: hits, misses, files changed behind the cache's back ------------------------------


def test_hits_and_misses_are_counted_one_by_one(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    store(cache, A, 100)
    for _ in range(2):
        fd = cache.open_complete(A)
        os.close(fd)
        cache.release(A)
        assert cache.open_complete(B) is None
    assert (cache.stats.hits, cache.stats.misses) == (2, 2)


def test_a_cached_file_deleted_behind_the_caches_back_is_a_miss_and_forgotten(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    store(cache, A, 100)
    store(cache, B, 200)
    os.unlink(cache.complete_path(A))
    os.unlink(cache.complete_path(B))
    assert cache.open_complete(A) is None and cache.open_complete(B) is None
    assert cache.stats.misses == 2 and cache.stats.hits == 0
    assert not cache.contains(A) and not cache.contains(B)
    assert cache.usage()["idle_bytes"] == 0


def test_a_cached_file_swapped_for_a_symlink_is_never_followed(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    store(cache, A, 100)
    secret = tmp_path / "secret"
    secret.write_bytes(b"not a recording")
    os.unlink(cache.complete_path(A))
    os.symlink(secret, cache.complete_path(A))
    assert cache.open_complete(A) is None
    assert cache.stats.misses == 1


def test_a_file_the_cache_does_not_track_is_a_miss(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    (tmp_path / "cache" / "complete" / B).write_bytes(b"y" * 50)   # appeared after the start
    assert cache.open_complete(B) is None
    assert cache.stats.misses == 1 and cache.usage()["pinned"] == 0


# -- commit and sync -------------------------------------------------------------------------


def test_a_commit_that_cannot_store_the_file_names_the_recording_and_the_reason(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    partial = fill(cache, A, 100)
    os.mkdir(cache.complete_path(A))                   # something in the way of the rename
    with pytest.raises(errors.CacheError) as caught:
        partial.commit()
    message = str(caught.value)
    assert f"recording {A}: cannot store the download: " in message
    assert os.strerror(errno.EISDIR) in message
    assert not partial.committed
    partial.discard()
    partial.close()


def test_sync_closes_the_writers_descriptor_and_a_second_sync_is_harmless(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    partial = fill(cache, A, 100)
    partial.commit()
    partial.sync()
    assert len(_fds_on(cache.complete_path(A))) == 1   # only the readers' side is left
    partial.sync()
    partial.close()
    assert _fds_on(cache.complete_path(A)) == []


def test_a_link_planted_for_a_pinned_name_is_removed_when_the_pin_goes(tmp_path):
    # Module docstring, "Trust": anything but a regular file of ours in complete/ is removed
    # (the entry itself, never what it points to).
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    target = tmp_path / "target"
    target.write_bytes(b"t" * 500)
    partial = cache.new_partial(A)                      # a download in progress pins A
    os.symlink(target, cache.complete_path(A))
    partial.discard()
    partial.close()                                     # the last pin goes
    assert not os.path.lexists(cache.complete_path(A)) and target.read_bytes() == b"t" * 500
    assert not cache.contains(A) and cache.size_of(A) is None
    assert cache.usage()["idle_bytes"] == 0


def test_closing_a_partial_file_twice_drops_its_pin_once(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=1000)
    store(cache, A, 300)
    fd = cache.open_complete(A)                         # a reader holds A
    again = fill(cache, A, 300)                         # and a second download of A finishes
    again.commit()
    again.sync()
    again.close()
    again.close()                                       # once is enough: the reader's pin stays
    assert cache.usage()["pinned"] == 1
    with pytest.raises(errors.CacheError) as caught:
        again.pread(10, 0)
    assert f"recording {A}: its cache file is closed" in str(caught.value)
    os.close(fd)
    cache.release(A)
    assert cache.usage()["pinned"] == 0 and cache.contains(A)


# -- a cache folder that cannot be reached ------------------------------------------------------


@pytest.mark.parametrize("shape", ["file-on-the-way", "name-too-long"])
def test_a_cache_folder_that_cannot_be_reached_is_a_clear_error(tmp_path, shape):
    if shape == "file-on-the-way":
        (tmp_path / "file").write_bytes(b"")
        root, reason = tmp_path / "file" / "sub" / "cache", os.strerror(errno.ENOTDIR)
    else:
        root, reason = tmp_path / ("x" * 300) / "cache", os.strerror(errno.ENAMETOOLONG)
    with pytest.raises(errors.ConfigError) as caught:
        CacheDir(str(root), "pbx")
    assert str(root) in str(caught.value) and reason in str(caught.value)
    assert "--cache-dir" in str(caught.value)
