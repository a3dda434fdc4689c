"""User errors end in one line; anything else (a bug) keeps its traceback."""

from __future__ import annotations

import pytest
from hydra.errors import InstantiationException
from omegaconf.errors import MissingMandatoryValue

from anomaly.errors import CheckpointError, ConfigError, DatasetError
from anomaly.runtime import exit_on_user_error, user_error_message


@pytest.mark.parametrize("error_type", [DatasetError, ConfigError, CheckpointError])
def test_project_errors_exit_with_one_line(error_type):
    expected = "^error: a.png: bad mask values$"
    with pytest.raises(SystemExit, match=expected) as stop, exit_on_user_error():
        raise error_type("a.png: bad\n mask values")
    assert stop.value.code == "error: a.png: bad mask values"


def test_errors_wrapped_by_hydra_are_unwrapped():
    try:
        try:
            raise ConfigError("data.val_fraction must be in (0, 1), got 2")
        except ConfigError as cause:
            raise InstantiationException("Error in call to target\nfull_key: data") from cause
    except InstantiationException as wrapped:
        assert user_error_message(wrapped) == "data.val_fraction must be in (0, 1), got 2"
    assert user_error_message(MissingMandatoryValue("Missing mandatory value: data.root"))


@pytest.mark.parametrize("bug", [ValueError("shapes differ"), RuntimeError("CUDA"), KeyError("x")])
def test_other_errors_keep_their_traceback(bug):
    with pytest.raises(type(bug), match=str(bug.args[0])), exit_on_user_error():
        raise bug
    assert user_error_message(InstantiationException("wrapped")) is None
