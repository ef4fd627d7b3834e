module testimage

go 1.22
