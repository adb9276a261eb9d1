"""Zero-configuration pytest for the Scipion tests (scipion_reference.md §6.3 item 6).

pyworkflow reads its configuration once, at import, so the headless environment (hosts.conf,
SCIPION_DOMAIN, SCIPION_PYTHON, SCIPION_USER_DATA, ...) is set here, before any test module
imports pyworkflow. Values already in the environment win.
"""

import tempfile

from mspecies.scipion_env import configure_headless_scipion

configure_headless_scipion(tempfile.mkdtemp(prefix="mspecies-scipion-"))
