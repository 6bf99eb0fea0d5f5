"""Settings that switch users need Bastion to start as root: a clear error otherwise."""

from __future__ import annotations

import pwd

from bastion.proxy.config.load import config_from_dict
from bastion.proxy.config.model import Config
from bastion.proxy.control.main import privilege_problems

NOBODY = pwd.getpwnam("nobody").pw_uid


def config(**top: object) -> Config:
    return config_from_dict({
        "listen": [{"address": "127.0.0.1:18999"}],
        "apps": {"shop": {"command": ["true"], "user": "nobody"},
                 "blog": {"command": ["true"], "path": "/blog"}},
        **top,
    }, source="bastion.yaml")


def test_root_may_switch_users() -> None:
    assert privilege_problems(config(user="nobody"), 0) == []


def test_without_root_each_user_setting_is_named() -> None:
    root = pwd.getpwuid(0).pw_name
    problems = privilege_problems(config(user=root), NOBODY)
    assert len(problems) == 1
    assert problems[0].startswith("bastion.yaml: user: 'root' needs Bastion to start as root")
    problems = privilege_problems(
        config_from_dict({"listen": [{"address": "127.0.0.1:18999"}],
                          "apps": {"shop": {"command": ["true"], "user": "root"}}},
                         source="b.yaml"), NOBODY)
    assert problems == ["b.yaml: app 'shop' runs as user 'root', which needs Bastion to "
                        "start as root (it runs as 'nobody')"]


def test_a_user_setting_naming_oneself_is_fine() -> None:
    assert privilege_problems(config(), NOBODY) == []
