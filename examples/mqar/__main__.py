from examples.mqar.run import main

raise SystemExit(main())
