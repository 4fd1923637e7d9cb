from pipeline.params.cli import main

raise SystemExit(main())
