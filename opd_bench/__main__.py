from opd_bench.cli import main

main()
