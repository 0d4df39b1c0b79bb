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
    & (Join-Path $Bin 'python.exe') -m scail_win sample @args
    $Status = $LASTEXITCODE
} finally {
    $env:PATH = $SavedPath
    $env:VIRTUAL_ENV = $SavedVenv
}
exit $Status
