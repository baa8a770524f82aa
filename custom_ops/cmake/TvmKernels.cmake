# The TVM-tuned kernels linked into the library: object files generated from the committed
# MetaSchedule databases by `python -m tvm_schedules.build` (see SHERRY_TVM in CMakeLists.txt).

# Sets `out_var` to the folder holding tvm_table.cc and the kernel objects, or to "" when the library
# is built without them.
function(sherry_tvm_kernels out_var)
  set(${out_var} "" PARENT_SCOPE)
  if(SHERRY_TVM STREQUAL "OFF")
    return()
  endif()
  if(SHERRY_TVM_DIR)
    if(NOT EXISTS "${SHERRY_TVM_DIR}/tvm_table.cc")
      message(FATAL_ERROR "SHERRY_TVM_DIR=${SHERRY_TVM_DIR} has no tvm_table.cc: run "
        "python -m tvm_schedules.build tvm_schedules/databases ${SHERRY_TVM_DIR}")
    endif()
    set(${out_var} "${SHERRY_TVM_DIR}" PARENT_SCOPE)
    return()
  endif()
  find_package(Python 3.10 COMPONENTS Interpreter)
  set(can_build FALSE)
  if(Python_Interpreter_FOUND)
    execute_process(COMMAND "${Python_EXECUTABLE}" -c "import tvm, tvm_ffi"
                    RESULT_VARIABLE no_tvm OUTPUT_QUIET ERROR_QUIET)
    if(no_tvm EQUAL 0)
      set(can_build TRUE)
    endif()
  endif()
  if(NOT can_build)
    if(SHERRY_TVM STREQUAL "ON")
      message(FATAL_ERROR "SHERRY_TVM=ON but the configuring Python (${Python_EXECUTABLE}) cannot import "
        "tvm: install apache-tvm==0.27.0.post1 and apache-tvm-ffi==0.1.14.post1, or pass -DSHERRY_TVM=OFF")
    endif()
    message(STATUS "TVM kernels: left out (this Python cannot import tvm; the tvm kernel path declines "
      "every shape). Build in an environment with apache-tvm, without build isolation, to include them.")
    return()
  endif()
  set(dest "${CMAKE_BINARY_DIR}/tvm_kernels")
  file(GLOB databases "${SHERRY_ROOT}/tvm_schedules/databases/*/*.json")
  file(GLOB generators "${SHERRY_ROOT}/tvm_schedules/*.py")
  # Re-run configure (and so the generation) when a database or the generator changes.
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${databases} ${generators})
  message(STATUS "TVM kernels: generating from ${SHERRY_ROOT}/tvm_schedules/databases")
  execute_process(
    COMMAND "${CMAKE_COMMAND}" -E env "PYTHONPATH=${SHERRY_ROOT}"
            "${Python_EXECUTABLE}" -m tvm_schedules.build "${SHERRY_ROOT}/tvm_schedules/databases" "${dest}"
    WORKING_DIRECTORY "${SHERRY_ROOT}"
    RESULT_VARIABLE failed OUTPUT_VARIABLE output ERROR_VARIABLE error)
  if(failed)
    message(FATAL_ERROR "python -m tvm_schedules.build failed (${failed}):\n${output}${error}\n"
      "Pass -DSHERRY_TVM=OFF to build without the TVM kernels.")
  endif()
  set(${out_var} "${dest}" PARENT_SCOPE)
endfunction()
