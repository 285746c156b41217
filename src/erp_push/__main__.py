from erp_push.cli import main

main()
