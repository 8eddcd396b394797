import tokenwire


def test_all_is_sorted_and_complete():
    assert tokenwire.__all__ == sorted(tokenwire.__all__)
    public = {name for name in vars(tokenwire) if not name.startswith("_")}
    modules = {"providers", "stores"}
    assert public - modules == set(tokenwire.__all__)
