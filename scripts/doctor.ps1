<#
.SYNOPSIS
    Runs `scail-win doctor` in scail-win's virtual environment; every argument is passed on.

.DESCRIPTION
    The environment is the folder named by SCAIL_WIN_VENV, else .venv in the
    scail-win checkout (where scripts\install.ps1 puts it). Run it from the
    SCAIL checkout: the checkout and the weights (./SCAIL-Preview) are found
    from the current folder. `doctor.ps1 --help` lists the options.

.EXAMPLE
    & "C:\My Tools\scail-win\scripts\doctor.ps1" --weights D:\models\SCAIL-Preview
#>
& (Join-Path $PSScriptRoot 'scail-win.ps1') doctor @args
exit $LASTEXITCODE
