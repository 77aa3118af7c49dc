"""``python -m zeal_asgi run APP --workers N``: the launcher."""

from __future__ import annotations

import sys

from zeal_asgi.launcher import main

sys.exit(main())
