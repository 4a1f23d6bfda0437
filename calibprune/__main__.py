from calibprune.cli import main

raise SystemExit(main())
