"""The test processes' TensorFlow setting (tests/site/sitecustomize.py): Grappler off in the pytest
workers and in the processes they start, on where a test asks for users' setting."""

import json
import subprocess
import sys

from training_helpers import subprocess_env

_OPTIONS = "import json, tensorflow as tf; print(json.dumps(tf.config.optimizer.get_experimental_options()))"


def test_the_fixture_switches_it_on_for_its_test(graph_optimiser_on):
    import tensorflow as tf

    assert tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer") is False


def test_it_is_off_in_this_worker_and_again_after_the_fixture():
    import tensorflow as tf

    assert tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer") is True


def test_a_started_process_has_it_off_unless_its_environment_asks_for_it():
    def options(**extra):
        r = subprocess.run([sys.executable, "-c", _OPTIONS], env=subprocess_env(**extra), capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    assert options().get("disable_meta_optimizer") is True
    assert options(SPM_TEST_GRAPPLER="on").get("disable_meta_optimizer", False) is False
