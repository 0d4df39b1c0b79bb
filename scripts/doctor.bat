@echo off
rem Runs "scail-win doctor" in scail-win's virtual environment; every argument is passed on.
rem The environment is the folder named by SCAIL_WIN_VENV, else .venv in the scail-win
rem checkout (where scripts\install.ps1 puts it). Run it from the SCAIL checkout, e.g.
rem   "C:\My Tools\scail-win\scripts\doctor.bat" --weights "D:\models\SCAIL-Preview"
setlocal
if defined SCAIL_WIN_VENV (set "VENV=%SCAIL_WIN_VENV%") else (set "VENV=%~dp0..\.venv")
if not exist "%VENV%\Scripts\python.exe" (
    echo error: no Python environment at "%VENV%": run scripts\install.ps1, or set SCAIL_WIN_VENV 1>&2
    exit /b 2
)
call "%VENV%\Scripts\activate.bat"
"%VENV%\Scripts\python.exe" -m scail_win doctor %*
exit /b %ERRORLEVEL%
