from asyncraft.cli import main

raise SystemExit(main())
