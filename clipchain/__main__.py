"""``python -m clipchain study ...``: the same as the ``clipchain`` console script."""

from clipchain.study.cli import main

raise SystemExit(main())
