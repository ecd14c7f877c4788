"""training/checkpoints.py: the run folder's lock."""

from midisc.run_folder import LOCK_FILENAME
from midisc.training.checkpoints import RunLock


def test_a_lock_is_exclusive_and_leaves_no_file_once_released(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    assert first.acquire() and (tmp_path / LOCK_FILENAME).is_file()
    assert not second.acquire() and second.holder() == first.holder()
    first.release()
    assert not (tmp_path / LOCK_FILENAME).exists()
    assert second.acquire() and (tmp_path / LOCK_FILENAME).is_file()  # a new file, really held
    assert not RunLock(tmp_path).acquire()
    second.release()
    assert not (tmp_path / LOCK_FILENAME).exists()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILENAME).write_text("12345")  # kill -9 leaves the file; the OS freed the lock
    lock = RunLock(tmp_path)
    assert lock.acquire() and lock.holder() != "12345"
    lock.release()


def test_a_completed_run_folder_keeps_no_lock(trained_run):
    work, _ = trained_run
    assert (work / "out" / "sae").is_dir() and not (work / "out" / LOCK_FILENAME).exists()
