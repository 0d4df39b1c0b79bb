<#
.SYNOPSIS
    Runs `scail-win sample` in scail-win's virtual environment; every argument is passed on.

.DESCRIPTION
    The environment is the folder named by SCAIL_WIN_VENV, else .venv in the
    scail-win checkout (where scripts\install.ps1 puts it). Run it from the
    SCAIL checkout: weights (./SCAIL-Preview) and example folders are found
    from the current folder. `sample.ps1 --help` lists the options.

.EXAMPLE
    & "C:\My Tools\scail-win\scripts\sample.ps1" --input-dir examples\001 --prompt 'the girl is dancing'
#>
& (Join-Path $PSScriptRoot 'scail-win.ps1') sample @args
exit $LASTEXITCODE
