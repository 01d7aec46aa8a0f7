"""checkpoint.check_compatible: what may differ between a workdir's config and a new run's."""

import json

import pytest

from mpxla.train import checkpoint
from mpxla.train import config as config_lib


def _config_dict(**overrides):
  c = config_lib.load("configs/gpt_tiny.py")
  for k, v in overrides.items():
    config_lib.override(c, k, v)
  return json.loads(config_lib.to_json(c))


def _old_workdir(tmp_path):
  """A workdir made before model.moe_lbl_scope / moe_axis_name existed in the config."""
  saved = _config_dict()
  for key in ("moe_lbl_scope", "moe_axis_name"):
    del saved["model"][key]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  return tmp_path


def test_keys_added_later_resume_at_their_old_value(tmp_path):
  saved = checkpoint.read_config(_old_workdir(tmp_path))

  def check(**overrides):
    checkpoint.check_compatible(saved, _config_dict(**overrides), str(tmp_path))

  check()  # the defaults: what the old run used
  check(total_steps="900")  # run length may change
  with pytest.raises(checkpoint.IncompatibleWorkdir, match="model.moe_lbl_scope: saved 'global', "
                     "now 'micro_batch'"):
    check(**{"model.moe_lbl_scope": "micro_batch"})
  with pytest.raises(checkpoint.IncompatibleWorkdir, match="model.d_model"):
    check(**{"model.d_model": "64"})


def test_unreadable_config_json_is_named(tmp_path):
  (tmp_path / "config.json").write_text('{"seed": 0, ')
  with pytest.raises(checkpoint.IncompatibleWorkdir, match="config.json is not valid JSON"):
    checkpoint.read_config(tmp_path)
