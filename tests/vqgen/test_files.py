"""Atomic folders and safe names."""

from vqgen.files import commit_dir, safe_name


def test_commit_dir_replaces_a_folder_only_when_the_new_one_is_complete(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old").write_text("1")
    tmp = tmp_path / ".model.tmp"
    tmp.mkdir()
    (tmp / "new").write_text("2")
    commit_dir(tmp, final)
    assert [p.name for p in final.iterdir()] == ["new"] and not tmp.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_names_that_reach_paths_cannot_escape():
    assert safe_name("../../etc/passwd") == "etc_passwd"
    assert "/" not in safe_name("a/b\\c") and safe_name("..") == "unnamed"
    assert safe_name("seven") == "seven"
