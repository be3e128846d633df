"""D4RL-format reading / writing: round trip, qlearning_dataset semantics, bad input."""
from __future__ import annotations

import os
import numpy as np
import pytest

from lit_qlearn.data import DatasetError, read_d4rl, write_d4rl
from lit_qlearn.data.d4rl import load_d4rl_raw, read_d4rl_metadata, resolve_dataset_path


def test_write_read_round_trip(tmp_path, arrays):
    a = arrays(n=120, ds=4, da=3)
    a["next_observations"] = a["observations"] + 1
    a["observations"] = a["observations"].astype(np.float64)  # stored as given
    before = {k: v.copy() for k, v in a.items()}
    meta = {"env_id": "Toy-v0", "seed": 7, "policy_mean_return": 12.5, "vec": np.arange(3.0)}
    path = write_d4rl(tmp_path / "sub" / "dir" / "toy.hdf5", a, meta)  # parents created

    assert path == tmp_path / "sub" / "dir" / "toy.hdf5"
    assert sorted(p.name for p in path.parent.iterdir()) == ["toy.hdf5"]  # no temp file left
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() would create it, not mkstemp's 0600
    for k in a:  # the caller's arrays are untouched
        np.testing.assert_array_equal(a[k], before[k])
        assert a[k].dtype == before[k].dtype
    raw, got_meta = load_d4rl_raw(path)
    assert sorted(raw) == sorted(a)
    for k in a:
        np.testing.assert_array_equal(raw[k], a[k])
    assert raw["observations"].dtype == np.float64 and raw["terminals"].dtype == bool
    assert got_meta["env_id"] == "Toy-v0" and got_meta["seed"] == 7 and got_meta["policy_mean_return"] == 12.5
    np.testing.assert_array_equal(got_meta["vec"], [0.0, 1.0, 2.0])
    assert read_d4rl_metadata(path).keys() == got_meta.keys() == meta.keys()

    d = read_d4rl(path)
    assert {k: v.dtype for k, v in d.items()} == {
        "observations": np.float32, "actions": np.float32, "next_observations": np.float32,
        "rewards": np.float32, "terminals": bool, "episode_ends": bool,
    }
    # qlearning semantics on this file: rows < N-1 that are not timeouts
    keep = np.flatnonzero(~a["timeouts"][:-1])
    assert len(d["rewards"]) == len(keep) == 119 - 4
    np.testing.assert_array_equal(d["observations"], a["observations"][keep].astype(np.float32))
    np.testing.assert_array_equal(d["next_observations"], a["observations"][keep + 1].astype(np.float32))
    np.testing.assert_array_equal(d["rewards"], a["rewards"][keep])


def test_qlearning_dataset_semantics_by_hand(tmp_path, h5_file):
    # rows 0-3: episode A, truncated at row 3 (timeout); rows 4-6: episode B, terminal
    # at row 6; rows 7-8: episode C, cut by the end of the data.
    n = 9
    obs = np.stack([np.arange(n), 10 * np.arange(n)], axis=1).astype(np.float32)
    path = h5_file("hand.hdf5", {
        "observations": obs,
        "actions": (np.arange(n) / 10).reshape(n, 1).astype(np.float32),
        "rewards": np.arange(n) + 0.5,
        "terminals": np.array([0, 0, 0, 0, 0, 0, 1, 0, 0], bool),
        "timeouts": np.array([0, 0, 0, 1, 0, 0, 0, 0, 0], bool),
        # d4rl's qlearning_dataset ignores a stored next_observations: so do we
        "next_observations": obs + 1000,
    })
    d = read_d4rl(path)
    # kept: rows 0,1,2 (row 3 is a timeout), 4,5,6,7 (row 8 is the last row)
    np.testing.assert_array_equal(d["observations"][:, 0], [0, 1, 2, 4, 5, 6, 7])
    np.testing.assert_array_equal(
        d["next_observations"], [[1, 10], [2, 20], [3, 30], [5, 50], [6, 60], [7, 70], [8, 80]]
    )
    np.testing.assert_array_equal(d["actions"][:, 0], np.float32([0.0, 0.1, 0.2, 0.4, 0.5, 0.6, 0.7]))
    np.testing.assert_array_equal(d["rewards"], [0.5, 1.5, 2.5, 4.5, 5.5, 6.5, 7.5])
    np.testing.assert_array_equal(d["terminals"], [False, False, False, False, False, True, False])
    # last kept transition of A (row 2: row 3 dropped), of B (terminal), of C (row 8 dropped)
    np.testing.assert_array_equal(d["episode_ends"], [False, False, True, False, False, True, True])


def test_terminal_and_timeout_on_one_row_is_dropped_like_d4rl(h5_file, arrays):
    a = arrays(n=10, episode=100)
    a["terminals"][:] = False
    a["terminals"][4] = a["timeouts"][4] = True
    d = read_d4rl(h5_file("both.hdf5", a))
    np.testing.assert_array_equal(d["observations"], a["observations"][[0, 1, 2, 3, 5, 6, 7, 8]])
    assert not d["terminals"].any()
    np.testing.assert_array_equal(np.flatnonzero(d["episode_ends"]), [3, 7])


def test_old_files_without_timeouts_read_as_no_timeouts(h5_file, arrays):
    a = arrays(n=30)
    del a["timeouts"]
    d = read_d4rl(h5_file("v0.hdf5", a))
    assert len(d["rewards"]) == 29
    np.testing.assert_array_equal(d["terminals"], a["terminals"][:29])


def test_resolve_d4rl_names(isolated_dirs, arrays):
    d4rl_dir = isolated_dirs / "d4rl"
    write_d4rl(d4rl_dir / "hopper_medium_replay-v2.hdf5", arrays(n=20))  # d4rl's download name
    write_d4rl(d4rl_dir / "mine.hdf5", arrays(n=20))
    assert resolve_dataset_path("hopper-medium-replay-v2") == d4rl_dir / "hopper_medium_replay-v2.hdf5"
    assert resolve_dataset_path("mine") == d4rl_dir / "mine.hdf5"
    assert resolve_dataset_path(d4rl_dir / "mine.hdf5") == d4rl_dir / "mine.hdf5"
    with pytest.raises(DatasetError) as e:
        resolve_dataset_path("walker2d-medium-v2")
    msg = str(e.value)
    assert "'walker2d-medium-v2'" in msg and str(d4rl_dir) in msg and "walker2d_medium-v2.hdf5" in msg
    assert "\n" not in msg


# ------------------------------------------------------------------- bad input


def _broken(arrays, what):
    a = arrays(n=50)
    if what == "missing rewards":
        del a["rewards"]
    elif what == "short actions":
        a["actions"] = a["actions"][:-1]
    elif what == "nan observations":
        a["observations"][17, 1] = np.nan
    elif what == "inf actions":
        a["actions"][3, 0] = -np.inf
    elif what == "nan rewards":
        a["rewards"][44] = np.nan
    elif what == "2-d rewards":
        a["rewards"] = a["rewards"][:, None]
    return a


BAD = {
    "missing rewards": ["required key 'rewards' is missing", "(N,)"],
    "short actions": ["'actions' has 49 rows", "'observations' has 50"],
    "nan observations": ["'observations'", "nan", "row 17"],
    "inf actions": ["'actions'", "inf", "row 3"],
    "nan rewards": ["'rewards'", "nan", "row 44"],
    "2-d rewards": ["'rewards' has shape (50, 1)", "(N,)"],
}


@pytest.mark.parametrize("what", BAD)
def test_bad_files_raise_one_line_errors_and_stay_unchanged(what, arrays, h5_file, sha256):
    path = h5_file(f"{what.replace(' ', '_')}.hdf5", _broken(arrays, what))
    digest = sha256(path)
    with pytest.raises(DatasetError) as e:
        read_d4rl(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    for part in BAD[what]:
        assert part in msg
    assert sha256(path) == digest


@pytest.mark.parametrize("what", BAD)
def test_writer_validates_like_the_reader(what, arrays, tmp_path):
    with pytest.raises(DatasetError) as e:
        write_d4rl(tmp_path / "out.hdf5", _broken(arrays, what))
    assert all(part in str(e.value) for part in BAD[what]) and "write_d4rl(arrays)" in str(e.value)
    assert not any(tmp_path.iterdir())


def test_writer_rejects_unknown_keys(arrays, tmp_path):
    a = arrays(n=10)
    a["reward"] = a.pop("rewards")
    with pytest.raises(DatasetError, match=r"unknown key\(s\) \['reward'\]"):
        write_d4rl(tmp_path / "out.hdf5", a)


def test_failed_write_leaves_previous_file_and_no_temp(arrays, tmp_path, sha256):
    path = write_d4rl(tmp_path / "data.hdf5", arrays(n=10))
    digest = sha256(path)
    with pytest.raises(TypeError):  # h5py cannot store an arbitrary object, mid-write
        write_d4rl(path, arrays(n=20, seed=1), {"bad": object()})
    assert sha256(path) == digest
    assert [p.name for p in tmp_path.iterdir()] == ["data.hdf5"]


def test_not_an_hdf5_file(tmp_path, sha256):
    path = tmp_path / "notes.hdf5"
    path.write_text("hello")
    with pytest.raises(DatasetError, match="not a readable HDF5 file") as e:
        read_d4rl(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
    assert path.read_text() == "hello"


def test_all_rows_timeouts_leaves_no_transitions(arrays, h5_file):
    a = arrays(n=5)
    a["timeouts"][:] = True
    with pytest.raises(DatasetError, match="no transitions left"):
        read_d4rl(h5_file("t.hdf5", a))


def test_a_dataset_with_zero_rows_is_a_dataset_error(tmp_path):
    import h5py

    path = tmp_path / "empty.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"], f["actions"] = np.zeros((0, 3), np.float32), np.zeros((0, 2), np.float32)
        f["rewards"], f["terminals"], f["timeouts"] = np.zeros(0, np.float32), np.zeros(0, bool), np.zeros(0, bool)
    with pytest.raises(DatasetError, match="empty.hdf5: holds no rows"):
        read_d4rl(path)


# ------------------------------------------------------------ OS errors on data paths


@pytest.mark.parametrize("where, reason", [("under a file", "File exists"), ("a directory", "Is a directory")])
def test_write_os_errors_are_dataset_errors_naming_the_path(where, reason, arrays, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    target = blocker / "out.hdf5" if where == "under a file" else tmp_path / "a-dir"
    if where == "a directory":
        target.mkdir()
    with pytest.raises(DatasetError) as e:
        write_d4rl(target, arrays(n=10))
    assert str(e.value).startswith(f"{target}: cannot write the file ({reason}")
    assert blocker.read_text() == "keep me" and not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("*/.*"))


def test_a_path_that_cannot_be_looked_up_is_a_dataset_error(tmp_path, monkeypatch):
    # Tests run as root, whom an unsearchable directory does not stop: the stat a normal
    # user's lookup would fail with EACCES is made to fail that way here.
    import errno
    import pathlib

    def denied(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "is_file", denied)
    with pytest.raises(DatasetError) as e:
        resolve_dataset_path(tmp_path / "locked" / "x.hdf5")
    assert str(e.value) == (f"{tmp_path / 'locked' / 'x.hdf5'}: cannot be looked up (Permission denied; expected a "
                            "readable D4RL-format .hdf5 file)")
