from spingen.cli import main

raise SystemExit(main())
