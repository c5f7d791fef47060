# Project-wide warnings for our own C++ targets (call kvmem_target_warnings(tgt)).
function(kvmem_target_warnings tgt)
  target_compile_options(${tgt} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers>)
endfunction()
