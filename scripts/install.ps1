<#
.SYNOPSIS
    Installs scail-win and what SCAIL's sampling needs into a Python virtual environment.

.DESCRIPTION
    Creates the environment (or reuses it), installs CUDA builds of torch and
    torchvision from PyTorch's package index, then requirements-win.txt and
    scail-win from this checkout, and runs `scail-win doctor`.
    scripts\sample.ps1, sample.bat, doctor.ps1 and doctor.bat run in the same
    environment: .venv in the scail-win checkout, or the folder named by the
    SCAIL_WIN_VENV environment variable.

.PARAMETER Venv
    Folder of the virtual environment (default: .venv in the scail-win checkout).
    Give the same folder to the launchers through SCAIL_WIN_VENV.

.PARAMETER Cuda
    PyTorch build: cu128 (default), cu126, ... or cpu. `nvidia-smi` shows the
    newest CUDA version your driver runs; pick that one or an older one.

.PARAMETER Python
    python.exe (3.10, 3.11 or 3.12) that creates the environment. Default: the
    newest of those the py launcher knows, else python on PATH.

.PARAMETER Fast
    Also install the optional kernels triton-windows and sageattention
    (`--attention auto` then uses SageAttention where it runs). Never
    required: if they fail to install, the script warns and goes on.

.EXAMPLE
    powershell -ExecutionPolicy Bypass -File scripts\install.ps1

.EXAMPLE
    powershell -ExecutionPolicy Bypass -File scripts\install.ps1 -Fast

.EXAMPLE
    powershell -ExecutionPolicy Bypass -File "C:\My Tools\scail-win\scripts\install.ps1" -Venv "D:\envs\scail win" -Cuda cu126
#>
[CmdletBinding()]
param(
    [string]$Venv = '',
    [ValidatePattern('^(cu\d{3}|cpu)$')]
    [string]$Cuda = 'cu128',
    [string]$Python = '',
    [switch]$Fast
)

$ErrorActionPreference = 'Stop'
$Cuda = $Cuda.ToLowerInvariant()  # the index's folder names are lower case
$Root = Split-Path -Parent $PSScriptRoot
if (-not $Venv) { $Venv = Join-Path $Root '.venv' }
# Absolute, so a relative -Venv means the same to PowerShell and to pip.
$Venv = $ExecutionContext.SessionState.Path.GetUnresolvedProviderPathFromPSPath($Venv)
$Requirements = Join-Path $Root 'requirements-win.txt'
$SupportedPython = 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)'

function Invoke-Native {
    # A native program reports failure only through its exit code. Its stderr
    # must not become a terminating error (Windows PowerShell 5.1 does that
    # under 'Stop' when output is redirected), hence 'Continue' in here.
    param([Parameter(Mandatory = $true)][string]$Exe, [string[]]$Arguments = @())
    $ErrorActionPreference = 'Continue'
    & $Exe @Arguments
    if ($LASTEXITCODE -ne 0) {
        throw "failed with exit code ${LASTEXITCODE}: $Exe $($Arguments -join ' ')"
    }
}

function Find-Python {
    # Returns the command as an array: the program, then its leading arguments.
    $ErrorActionPreference = 'Continue'
    $candidates = @()
    if ($Python) {
        $candidates += , @($Python)
    } else {
        if (Get-Command py -ErrorAction SilentlyContinue) {
            foreach ($version in '3.12', '3.11', '3.10') { $candidates += , @('py', "-$version") }
        }
        if (Get-Command python -ErrorAction SilentlyContinue) { $candidates += , @('python') }
    }
    foreach ($command in $candidates) {
        # A missing program leaves $LASTEXITCODE as it was: check it exists first.
        if (-not (Get-Command $command[0] -ErrorAction SilentlyContinue)) { continue }
        $leading = @($command | Select-Object -Skip 1)
        & $command[0] @leading -c $SupportedPython 2>$null
        if ($LASTEXITCODE -eq 0) { return , $command }
    }
    throw 'no Python 3.10, 3.11 or 3.12 found: install one from https://www.python.org/downloads/windows/ or pass -Python C:\path\to\python.exe'
}

$VenvPython = Join-Path $Venv 'Scripts\python.exe'
if (Test-Path -LiteralPath $VenvPython -PathType Leaf) {
    Write-Host "Using the existing environment $Venv"
    & $VenvPython -c $SupportedPython
    if ($LASTEXITCODE -ne 0) { throw "$Venv holds a Python other than 3.10-3.12: remove it or pass another -Venv" }
} else {
    $command = Find-Python
    Write-Host "Creating the environment $Venv with $($command -join ' ')"
    Invoke-Native $command[0] (@($command | Select-Object -Skip 1) + @('-m', 'venv', $Venv))
}

Invoke-Native $VenvPython @('-m', 'pip', 'install', '--upgrade', 'pip')
Write-Host "Installing torch and torchvision ($Cuda) from PyTorch's package index"
Invoke-Native $VenvPython @('-m', 'pip', 'install', 'torch', 'torchvision',
                            '--index-url', "https://download.pytorch.org/whl/$Cuda")
Invoke-Native $VenvPython @('-m', 'pip', 'install', '-r', $Requirements)
Invoke-Native $VenvPython @('-m', 'pip', 'install', $Root)

if ($Fast) {
    # Each triton-windows minor release works with one torch minor release
    # (triton-windows' notes); the pairs known when this was written:
    $TritonFor = @{ '6' = '<3.3'; '7' = '<3.4'; '8' = '<3.5'; '9' = '<3.6'; '10' = '<3.7' }
    try {
        # No double quotes in a native argument: Windows PowerShell 5.1 drops them.
        $TorchMinor = & $VenvPython -c 'import torch; print(torch.__version__.split(''.'')[1])'
        $Triton = 'triton-windows'
        if ($TritonFor.ContainsKey("$TorchMinor")) { $Triton += $TritonFor["$TorchMinor"] }
        Write-Host "Installing the optional kernels: $Triton sageattention"
        Invoke-Native $VenvPython @('-m', 'pip', 'install', $Triton, 'sageattention')
    } catch {
        Write-Warning "the optional kernels did not install ($_); scail-win runs without them (PyTorch attention)"
    }
}

Write-Host ''
Write-Host 'Checking the installation (scail-win doctor):'
# doctor FAILs until the weights are downloaded; that must not stop the script.
$ErrorActionPreference = 'Continue'
& $VenvPython -m scail_win doctor
Write-Host ''
Write-Host 'Done. From the SCAIL checkout, run for example:'
Write-Host "  & '$PSScriptRoot\sample.ps1' --input-dir examples\001 --prompt 'the girl is dancing'"
if ($Venv -ne (Join-Path $Root '.venv')) {
    Write-Host "with SCAIL_WIN_VENV set to $Venv, so that the launchers find this environment."
}
