from llm_activations.cli import main

raise SystemExit(main())
