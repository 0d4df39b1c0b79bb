<#
.SYNOPSIS
    Runs `python -m scail_win` in scail-win's virtual environment; every argument is passed on.

.DESCRIPTION
    The environment is the folder named by SCAIL_WIN_VENV, else .venv in the
    scail-win checkout (where scripts\install.ps1 puts it). sample.ps1 and
    doctor.ps1 call this with their command; the exit status comes back.

.EXAMPLE
    & "C:\My Tools\scail-win\scripts\scail-win.ps1" hook
#>
$Venv = if ($env:SCAIL_WIN_VENV) { $env:SCAIL_WIN_VENV } else { Join-Path (Split-Path -Parent $PSScriptRoot) '.venv' }
$Bin = Join-Path $Venv 'Scripts'
if (-not (Test-Path -LiteralPath (Join-Path $Bin 'python.exe') -PathType Leaf)) {
    [Console]::Error.WriteLine("error: no Python environment at '$Venv': run scripts\install.ps1, or set SCAIL_WIN_VENV")
    exit 2
}
# What activation does, for this command only.
$SavedPath, $SavedVenv = $env:PATH, $env:VIRTUAL_ENV
$env:VIRTUAL_ENV = $Venv
$env:PATH = "$Bin;$env:PATH"
try {
    & (Join-Path $Bin 'python.exe') -m scail_win @args
    $Status = $LASTEXITCODE
} finally {
    $env:PATH = $SavedPath
    $env:VIRTUAL_ENV = $SavedVenv
}
exit $Status
