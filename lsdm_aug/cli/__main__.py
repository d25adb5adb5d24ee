from lsdm_aug.cli import main

main()
