from glmkit.cli import main

raise SystemExit(main())
